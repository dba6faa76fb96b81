"""The int8 copy of a cached model's language-model matrices, kept beside its float weights.

Rounding v0's matrices to 8 bits with one scale per row takes ~0.3 s, a third of a `--dtype int8`
load. The first such load of a model in the cache writes the result into the model's folder
(`model.int8.safetensors`, so `mellow models rm` removes it with the rest); later loads read it
instead of rounding again, and peak at less than half the memory. The copy holds the matrices in
the order `LlamaForCausalLM.matrices()` lists them and records which weights it was made from
(their size and modification time): a copy made from other weights is made again, and a file of
that name this module did not write is left alone. A model outside the cache (a folder of your
own) is rounded at every load: its folder is not ours to write in. A cache that cannot be written
(read only, full) loads as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from mellow_cli.errors import ModelError

FILE = "model.int8.safetensors"
FORMAT = "mellow-int8/1"  # a change of what the file holds or how it is rounded bumps this


class Int8Copy:
    """Where the int8 copy of `weights` is kept (`path`), and reading and writing it."""

    def __init__(self, path: Path, weights: Path):
        self.path, self.weights = path, weights

    @classmethod
    def beside(cls, files) -> "Int8Copy | None":
        """The copy for a loaded model's files (loading.ModelFiles), or None where its folder is
        not in the cache."""
        from mellow_cli.files import cache_dir

        if files.folder is None or not Path(files.folder).resolve().is_relative_to((cache_dir() / "models").resolve()):
            return None
        return cls(Path(files.folder) / FILE, Path(files.weights))

    def identity(self) -> dict[str, str]:
        """What a copy of today's weights records (safetensors metadata is text)."""
        stat = self.weights.stat()
        return {"format": FORMAT, "weights_size": str(stat.st_size), "weights_mtime_ns": str(stat.st_mtime_ns)}

    def read(self) -> "list | None":
        """The stored matrices (matrices.Int8Matrix), or None without a copy of these weights.
        Each is checked before it is used: step.c and torch's int8 kernel read `scale` by `q`'s
        rows, and a short table would be read past its end."""
        from safetensors import safe_open

        from mellow_cli.runtime.matrices import Int8Matrix

        try:
            with safe_open(str(self.path), framework="pt") as f:
                if f.metadata() != self.identity():
                    return None
                keys, count = set(f.keys()), len(f.keys()) // 2
                if keys != {f"{i}.{part}" for i in range(count) for part in ("q", "scale")}:
                    raise ValueError("its tensors are not the matrices' q and scale, numbered from 0")
                stored = [(f.get_tensor(f"{i}.q"), f.get_tensor(f"{i}.scale")) for i in range(count)]
        except FileNotFoundError:
            return None
        except Exception as e:  # SafetensorError, OSError: a damaged file
            raise ModelError(f"{self.path}: not a readable int8 copy ({str(e).splitlines()[0]}): delete it, "
                             "and the next --dtype int8 load makes it again") from None
        return [Int8Matrix.stored(q, scale) for q, scale in stored]

    def ours(self) -> bool:
        """Whether the file at `path` is a copy this module wrote (of any weights)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return (f.metadata() or {}).get("format", "").startswith("mellow-int8/")
        except Exception:
            return False

    def write(self, matrices: list) -> bool:
        """Keep `matrices` (matrices.Int8Matrix, in `matrices()` order) as the copy of today's
        weights, whole or not at all. False where it was not written: a file there that is not
        ours, or a folder that cannot take it."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        if self.path.exists() and not self.ours():
            return False
        self._drop_stale_partials()
        tensors = {}
        for i, m in enumerate(matrices):
            tensors[f"{i}.q"], tensors[f"{i}.scale"] = m.q.contiguous(), m.scale.contiguous()
        partial = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(partial), metadata=self.identity())
            os.replace(partial, self.path)
            return True
        except (OSError, SafetensorError):  # safetensors says so of a folder it cannot write
            partial.unlink(missing_ok=True)
            return False

    def _drop_stale_partials(self) -> None:
        """Delete what a writer killed part-way left (a partial copy named with its process id),
        once that process is gone; another process's partial under way is left to it."""
        for partial in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            pid = partial.name.rsplit("-", 1)[1]
            if pid.isdigit() and not _running(int(pid)):
                partial.unlink(missing_ok=True)

    def makers(self, stored: list):
        """(a matrix maker, a head maker) (see LlamaForCausalLM.prepare) handing out `stored` in
        turn, each checked against the float weight it stands for (its int8 matrix of that shape,
        one float32 scale per row), the head last of all."""
        import torch

        queue = iter(stored)

        def misfit() -> ModelError:
            return ModelError(f"{self.path}: this int8 copy does not fit the model's matrices: delete it, "
                              "and the next --dtype int8 load makes it again")

        def matrix(weight):
            m = next(queue, None)
            if m is None or m.q.dtype != torch.int8 or tuple(m.q.shape) != tuple(weight.shape) \
                    or m.scale.dtype != torch.float32 or tuple(m.scale.shape) != (weight.shape[0],):
                raise misfit()
            return m

        def head(weight):
            m = matrix(weight)
            if next(queue, None) is not None:  # matrices of another model
                raise misfit()
            return m

        return matrix, head


def _running(pid: int) -> bool:
    """Whether process `pid` exists (where that cannot be asked, assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and is someone else's
        return True
    return True
