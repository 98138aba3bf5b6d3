"""Credentials for SMTP AUTH and IMAP login: OAuth2 access tokens (:mod:`.tokens`) and the SASL
bearer mechanisms that carry them (:mod:`.sasl`). Passwords stay in the settings model."""

from .sasl import Mechanism, choose, describe_error_challenge, initial_response
from .tokens import OAuth2Config, Token, TokenError, fetch

__all__ = ["Mechanism", "OAuth2Config", "Token", "TokenError", "choose", "describe_error_challenge", "fetch",
           "initial_response"]
