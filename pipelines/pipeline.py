"""Code file of a diffusers-mdit Hub repository or saved folder.

``save_pretrained`` and ``push_to_hub`` of diffusers-mdit copy this file, unchanged, to

- ``pipeline.py`` at the root of a saved pipeline: ``model_index.json`` names it with
  ``"_class_name": ["pipeline", "<PipelineClass>"]``, which is how diffusers 0.42 finds a
  pipeline class that is not one of its own;
- ``<component>/diffusers_mdit.py`` next to every model of the package (e.g.
  ``transformer/diffusers_mdit.py``): diffusers loads a component whose library
  (``"diffusers_mdit"`` in ``model_index.json``) is not diffusers or transformers only from such
  a file, and refuses a Hub repository whose file is missing.

``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` imports this file
and takes the class named in ``model_index.json`` from it. The file defines no class itself: it
hands out the classes of the installed ``diffusers_mdit`` package, so the code that runs is the
package's (versioned, tested, and checking the files it loads), never a copy frozen in a repo.
"""

try:
    import diffusers_mdit
except ImportError as error:
    raise ImportError(
        "This repository holds a diffusers-mdit model or pipeline. Install the diffusers-mdit "
        "package (which defines its classes) in this environment to load it."
    ) from error


def __getattr__(name: str) -> type:
    """The public class ``name`` of the installed package (``model_index.json`` names it)."""
    value = getattr(diffusers_mdit, name, None)
    if name in diffusers_mdit.__all__ and isinstance(value, type):
        return value
    raise AttributeError(
        f"diffusers-mdit {diffusers_mdit.__version__} has no class {name!r}. The repository was "
        "probably saved by a newer diffusers-mdit: upgrade the package to load it."
    )
