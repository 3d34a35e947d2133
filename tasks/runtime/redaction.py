"""What is shown of a URI: printed summaries, logs and Prefect artifacts never carry its credentials.

A tracking or API URI may hold them (`https://user:token@mlflow.example.com`); processes still use
the URI as given, only what is displayed is redacted.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_uri(uri: str) -> str:
    """`uri` fit to show: the user name and token in it become `***`."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
