"""Data shipped with ssd: acceptance profiles (`python -m ssd.benchmark.record_profile`) and token
rankings (`python -m ssd.spec.rank_vocabulary`), each loaded by name or from a file of its format."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ssd.json_files import read_json


def load_shipped_json(name_or_path: str | Path, shipped: tuple[str, ...], suffix: str, what: str,
                      file_format: str, version: int) -> tuple[Path, dict]:
    """A file path, or the name of a shipped file `<name><suffix>` here; checked to be of file_format."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if str(name_or_path) not in shipped:
            raise FileNotFoundError(f"{what} {str(name_or_path)!r} is neither a file nor a shipped "
                                    f"{what} ({', '.join(shipped)})")
        path = Path(str(resources.files(__name__).joinpath(f"{name_or_path}{suffix}")))
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != file_format or data.get("version") != version:
        raise ValueError(f"{path} is not an {file_format} file of version {version}")
    return path, data

