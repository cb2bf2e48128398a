"""Reading the JSON files a user points the engine at (checkpoint configs, profiles, rankings): a
bad file is a ValueError that names it — the engine and the bench report ValueErrors as one-line refusals.
Also the GPU benches' result files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_json_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: Any) -> None:
    """A bench's result file, its missing parent directories made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
