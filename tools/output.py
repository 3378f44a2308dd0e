"""``--json``: every reporting command prints one JSON document instead of its lines
(the documents: ``cdpfs.api.documents``, the keys: the user guide)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document (its keys: the user guide).")


def echo_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2))
