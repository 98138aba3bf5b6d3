"""Host name matching of the TLS facts (RFC 6125), on getpeercert()-shaped dicts."""

from mail_selfcheck.probe.tls import hostname_matches


def test_dns_ip_and_wildcard_names():
    cert = {"subjectAltName": (("DNS", "mail.example.com"), ("DNS", "*.example.net"), ("IP Address", "192.0.2.7"))}
    assert hostname_matches(cert, "mail.example.com") and hostname_matches(cert, "MAIL.example.com.")
    assert hostname_matches(cert, "imap.example.net") and not hostname_matches(cert, "a.b.example.net")
    assert hostname_matches(cert, "192.0.2.7") and not hostname_matches(cert, "192.0.2.8")
    assert not hostname_matches(cert, "example.com")


def test_common_name_only_without_dns_names():
    cert = {"subject": ((("commonName", "legacy.example.org"),),)}
    assert hostname_matches(cert, "legacy.example.org") and not hostname_matches(cert, "other.example.org")
    assert not hostname_matches({"subject": ((("commonName", "x"),),), "subjectAltName": (("DNS", "y"),)}, "x")
