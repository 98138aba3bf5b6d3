"""Unit tests of message building and integrity verification (pure functions).

The received-message vectors come from ../shared/cases (copied into tests/unit/cases as
permanent regression tests); new vectors that appear in ../shared/cases are picked up too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mail_selfcheck.probe.message import IntegrityError, build_message, make_token, verify_message

HERE = Path(__file__).parent / "cases"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "cases"


def _cases():
    seen = {}
    for folder in (HERE, SHARED):
        index = folder / "integrity-cases.json"
        if index.is_file():
            for case in json.loads(index.read_text())["cases"]:
                seen.setdefault(case["file"], (folder, case))
    return [pytest.param(folder, case, id=name) for name, (folder, case) in sorted(seen.items())]


@pytest.mark.parametrize(("folder", "case"), _cases())
def test_received_vectors(folder: Path, case: dict) -> None:
    raw = (folder / case["file"]).read_bytes()
    if case["expect"] == "ok":
        verify_message(raw, case["token"], subject=case.get("subject"))
    else:
        with pytest.raises(IntegrityError) as err:
            verify_message(raw, case["token"], subject=case.get("subject"))
        assert case["reason_mentions"].lower() in str(err.value).lower()


def _sent(secret: str = "s3cret"):
    token, nonce = make_token(secret)
    return build_message("sender@example.test", "receiver@example.test", token, nonce), token


def test_built_message_verifies_against_itself() -> None:
    sent, token = _sent()
    verify_message(
        sent.raw,
        token,
        from_address="sender@example.test",
        to_address="receiver@example.test",
        subject=sent.subject,
        message_id=sent.message_id,
    )


def test_built_message_is_7bit_multipart_alternative_with_short_subject() -> None:
    sent, token = _sent()
    assert sent.raw.isascii()
    text = sent.raw.decode()
    assert "multipart/alternative" in text
    assert text.count(token) == 3  # header, text part, HTML part
    assert len(sent.subject) < 78
    assert "s3cret" not in sent.subject and "s3cret" not in sent.message_id
    assert all(len(line) <= 998 for line in sent.raw.split(b"\r\n"))  # RFC 5322 2.1.1


def test_tokens_and_message_ids_are_unique() -> None:
    ids = {_sent()[0].message_id for _ in range(50)}
    assert len(ids) == 50


def test_html_special_characters_in_secret_survive() -> None:
    sent, token = _sent('a&b<c>"d')
    assert b'a&amp;b&lt;c&gt;&quot;d' in sent.raw  # escaped inside the HTML part
    verify_message(sent.raw, token)


def test_non_ascii_secret_is_refused() -> None:
    token, nonce = make_token("sécret")
    with pytest.raises(ValueError, match="ASCII"):
        build_message("a@example.test", "b@example.test", token, nonce)


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (lambda raw: raw.replace(b"From: sender@", b"From: other@"), "From"),
        (lambda raw: raw.replace(b"To: receiver@", b"To: other@"), "To"),
        (lambda raw: raw.replace(b"Subject: [selfcheck]", b"Subject: [SPAM] [selfcheck]"), "Subject"),
        (lambda raw: raw.replace(b"X-Selfcheck-Token:", b"X-Other:"), "X-Selfcheck-Token header missing"),
    ],
)
def test_header_changes_are_integrity_failures(mutate, mentions: str) -> None:
    sent, token = _sent()
    with pytest.raises(IntegrityError, match=mentions):
        verify_message(
            mutate(sent.raw),
            token,
            from_address=sent.from_address,
            to_address=sent.to_address,
            subject=sent.subject,
            message_id=sent.message_id,
        )


def test_text_part_missing_is_named() -> None:
    sent, token = _sent()
    raw = sent.raw.replace(b"Content-Type: text/plain", b"Content-Type: application/octet-stream")
    with pytest.raises(IntegrityError, match="text part missing"):
        verify_message(raw, token)


def test_garbage_is_an_integrity_failure_not_a_crash() -> None:
    with pytest.raises(IntegrityError):
        verify_message(b"\x00\xff not a message", "tok/123")
