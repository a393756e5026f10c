"""A participant's join options from an offer: the language they speak (an interpreter room)
and whether they hear the other speakers' own voices. Refused with a clear 4xx when junk."""

from __future__ import annotations

from presence.bot.backends.languages import LANGUAGES, UnknownLanguage, check_language
from presence.config import Settings
from presence.signaling.contract import JoinOptions
from presence.signaling.errors import ApiError
from presence.signaling.tokens import TokenClaims

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def pick_join_options(
    settings: Settings, claims: TokenClaims | None, language: object, original: object
) -> JoinOptions:
    if claims is not None and claims.language:
        language = claims.language  # like the name: the token's word is final
    code = None
    if language is not None and language != "":
        if not isinstance(language, str):
            raise ApiError(400, "bad_request", "language must be a string such as 'es'")
        try:
            code = check_language(language)
        except UnknownLanguage as exc:
            raise ApiError(400, "unknown_language", str(exc)) from None
        offered = settings.interpret_languages
        if code not in offered:
            raise ApiError(
                400,
                "language_not_offered",
                f"{code} ({LANGUAGES.get(code, code)}) is not among this server's interpreter languages "
                f"({', '.join(offered)}): add it to interpret_languages (--interpret-languages "
                f"{','.join([*offered, code])}) with a translator for each pair (an Apertium pair, "
                "translate_url for an OpenAI-compatible endpoint, or translate_model)",
            )
    if original is None or original == "" or isinstance(original, bool):
        hear = original is not False
    elif isinstance(original, str) and original.lower() in _TRUE + _FALSE:
        hear = original.lower() in _TRUE
    else:
        raise ApiError(400, "bad_request", "original must be true or false")
    return JoinOptions(language=code, original=hear)
