"""What a node says when a model file it names is not there.

The host checks a file-name widget against the folder's listing and reports "'x' not in []",
which names neither the folder nor what belongs in it (a workflow from someone else, a file
not downloaded yet, a typo after a rename). Where this pack owns the input it checks the
name itself, before anything runs, and says which folder it looked in, what is there, and
where to put the file."""
from __future__ import annotations

from typing import Iterable, Union

_SHOWN = 8


def validate_file(folder: str, name: str, what: str, accept: Iterable[str] = ()) -> Union[bool, str]:
    """True when `name` is a file of the host's model folder `folder` (or one of `accept`,
    e.g. an "auto" choice); otherwise the message to show."""
    import folder_paths

    if name in tuple(accept):
        return True
    if isinstance(name, str) and name and folder_paths.get_full_path(folder, name) is not None:
        return True
    try:
        paths = list(folder_paths.get_folder_paths(folder))
    except Exception:  # an unregistered folder: say the conventional place
        paths = []
    files = list(folder_paths.get_filename_list(folder))
    where = ", ".join(paths) if paths else f"models/{folder}"
    if files:
        listed = ", ".join(files[:_SHOWN]) + (f" (and {len(files) - _SHOWN} more)" if len(files) > _SHOWN else "")
        have = f"it holds {listed}"
    else:
        have = "it holds no files yet"
    return (f"{what} {name!r} was not found in the '{folder}' model folder ({where}); {have}. Put the file in "
            f"models/{folder} (or a folder extra_model_paths.yaml adds for '{folder}'), then refresh the page "
            "(press R), or pick one of the files there")


def all_valid(*results: Union[bool, str]) -> Union[bool, str]:
    problems = [r for r in results if r is not True]
    return True if not problems else "; ".join(str(p) for p in problems)
