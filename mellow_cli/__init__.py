"""mellow-cli: ask questions about sounds with the Mellow audio-language model (arXiv 2503.08540).

    import mellow_cli
    model = mellow_cli.load_model("v0")
    print(model.ask("dog.wav", "is there a dog barking?"))
"""

from mellow_cli.version import __version__


def load_model(name: str = "v0", device: str = "auto", dtype: str | None = None, progress: bool = True):
    """Load a model by name (`v0`, `v0_s`, ...), local path or hub id; see `mellow_cli.api`."""
    from mellow_cli.api import load_model as _load_model  # torch and transformers load only now

    return _load_model(name, device=device, dtype=dtype, progress=progress)


__all__ = ["load_model", "__version__"]
