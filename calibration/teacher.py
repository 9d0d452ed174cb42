"""The teacher of router training: the dense model's next-token distributions, reduced to their top k, kept on disk.

**Targets.** Per position, the dense model's top-k log-probabilities (float16), their token ids (int32) and the log
of the remaining probability mass (float32): :class:`TeacherTargets`. The full distribution is never stored
(49152 x 4 bytes per token would be ~200 GB for 1 M tokens; k = 64 is ~400 bytes a token).

**Loss.** :func:`topk_kl` is KL(teacher || student) between the two distributions *coarsened* to the teacher's
top-k tokens plus one "rest" bucket. It is an approximation of the full KL, and a lower bound of it (merging
outcomes never increases a KL); it equals the full KL when k is the vocabulary size. Targets are always rounded to
the stored precision, so a run computes the same numbers whether they came from the cache or a fresh dense pass.

**Cache.** :class:`TeacherCache`: a folder per model and k (keyed by the model's source, shape, dtype, a stamp of
its weights and k), one file per training block named by a hash of the block's own token ids, so a change of the
data, its part, the tokenizer or the sequence length finds no entry and is computed anew. Each entry is written
atomically: a partial entry is never read. Entries are computed the first time a block is trained on and reused by
later epochs and later runs; nothing is ever evicted (~200 KB per 512-token block at k = 64).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..fileio import cache_root, save_safetensors_atomic, write_json_atomic
from ..policies import FORCE_COMPUTE, block_positions
from ..runtime import SkipRuntime
from .router_settings import NO_TEACHER_CACHE, TEACHER_CACHE_AUTO

CACHE_FORMAT = 1
MANIFEST = "teacher.json"


@dataclass
class TeacherTargets:
    """The dense model's reduced next-token distributions for ``[...]`` positions."""

    logprobs: Tensor  # [..., k] float16: the top-k log-probabilities
    ids: Tensor  # [..., k] int32: their token ids
    rest: Tensor  # [...] float32: log of the probability mass outside the top k (-inf when k covers the vocabulary)

    def select(self, mask: Tensor) -> "TeacherTargets":
        """The positions `mask` marks (a boolean mask over the leading dimensions)."""
        return TeacherTargets(self.logprobs[mask], self.ids[mask], self.rest[mask])

    def to(self, device: torch.device | str) -> "TeacherTargets":
        return TeacherTargets(self.logprobs.to(device), self.ids.to(device), self.rest.to(device))

    @staticmethod
    def stack(targets: list["TeacherTargets"]) -> "TeacherTargets":
        return TeacherTargets(torch.stack([t.logprobs for t in targets]), torch.stack([t.ids for t in targets]),
                              torch.stack([t.rest for t in targets]))


def teacher_targets(logits: Tensor, k: int) -> TeacherTargets:
    """The top-k targets of next-token `logits` ``[..., vocab]``, rounded to the stored precision."""
    logp = F.log_softmax(logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return TeacherTargets(top.half(), ids.int(), rest)


def topk_kl(teacher: TeacherTargets, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) over the teacher's top-k tokens plus the rest bucket (see the
    module docstring: an approximation and lower bound of the full KL, equal to it when k = vocabulary)."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    ids = teacher.ids.long()
    logp_top = teacher.logprobs.float()
    kl = (logp_top.exp() * (logp_top - logq.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < logq.shape[-1]:  # with the whole vocabulary in the top k there is no rest
        logq_rest = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1)
        kl = kl + teacher.rest.exp() * (teacher.rest - logq_rest)
    return kl.mean()


def full_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """The exact mean KL(teacher || student) over positions (what :func:`topk_kl` approximates)."""
    logp, logq = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


# -- the dense pass --------------------------------------------------------------------------------------
@contextmanager
def dense(rt: SkipRuntime) -> Iterator[None]:
    """Every FFN runs (the teacher's pass through the model the runtime wraps)."""
    previous = rt.controller.override
    rt.set_override([FORCE_COMPUTE] * rt.policy.num_layers)
    try:
        yield
    finally:
        rt.set_override(previous)


@torch.no_grad()
def dense_targets(rt: SkipRuntime, ids: Tensor, k: int) -> TeacherTargets:
    """The dense model's top-k targets for token blocks `ids` ``[batch, seq]`` (every position)."""
    with dense(rt):
        logits = rt.model(ids, position_ids=block_positions(ids)).logits
    return teacher_targets(logits, k)


# -- the cache -------------------------------------------------------------------------------------------
def weights_stamp(model: nn.Module) -> str:
    """A short digest of the model's weights: names, shapes, dtypes and a strided sample of every tensor's values
    (cheap for any size, and different for different weights)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_key(model: nn.Module, source: str, k: int) -> dict[str, object]:
    """What a cache folder is keyed by: the model's source, shape, dtype and weights stamp, and k."""
    c = model.config
    shape = {name: int(getattr(c, attr)) for name, attr in (("layers", "num_hidden_layers"),
                                                            ("hidden", "hidden_size"), ("vocab", "vocab_size"))}
    dtype = str(next(model.parameters()).dtype)
    return {"format": CACHE_FORMAT, "source": source, "model_type": c.model_type, **shape, "dtype": dtype,
            "weights": weights_stamp(model), "topk": k}


def resolve_cache_root(choice: str) -> Path | None:
    """The folder ``--teacher-cache`` names (``auto``: under the skiptool cache; ``none``: no cache -> None)."""
    if choice == NO_TEACHER_CACHE:
        return None
    root = cache_root() / "teacher" if choice == TEACHER_CACHE_AUTO else Path(choice).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--teacher-cache {root} is a file, not a folder")
    return root


class TeacherCache:
    """Teacher targets of token blocks, one file per block, in a folder of one model and k (see the module
    docstring)."""

    def __init__(self, folder: Path, k: int) -> None:
        self.folder, self.k = folder, k

    @classmethod
    def open(cls, root: Path, model: nn.Module, source: str, k: int) -> "TeacherCache":
        """The cache folder under `root` for this model and k (its manifest written the first time)."""
        key = model_key(model, source, k)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = "".join(ch if ch.isalnum() else "-" for ch in Path(source).name or "model")[:40]
        folder = root / f"{name}-k{k}-{digest}"
        try:
            if not (folder / MANIFEST).is_file():
                write_json_atomic(folder / MANIFEST, key)
        except OSError as exc:
            raise ConfigError(f"cannot write the teacher cache in {root}: {exc.strerror or exc}") from None
        return cls(folder, k)

    def entry(self, block: Tensor) -> Path:
        """The file of one block ``[seq]``: named by a hash of its token ids."""
        tokens = block.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        return self.folder / f"{hashlib.sha256(tokens).hexdigest()[:32]}.safetensors"

    def load(self, block: Tensor) -> TeacherTargets | None:
        """The block's targets, or None when they are not cached (or their file cannot be read: recomputed)."""
        from safetensors.torch import load_file

        path = self.entry(block)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            targets = TeacherTargets(t["logprobs"], t["ids"], t["rest"])
        except Exception:  # noqa: BLE001 - an unreadable entry is computed again and rewritten
            return None
        return targets if targets.ids.shape == (block.shape[-1], self.k) else None

    def store(self, block: Tensor, targets: TeacherTargets) -> None:
        """Write one block's targets atomically."""
        tensors = {"logprobs": targets.logprobs.cpu().contiguous(), "ids": targets.ids.cpu().contiguous(),
                   "rest": targets.rest.cpu().contiguous()}
        save_safetensors_atomic(self.entry(block), tensors, {"seq_len": str(block.shape[-1])})


class Teacher:
    """The targets of training blocks: from the cache where it has them, else from a dense pass (then stored)."""

    def __init__(self, rt: SkipRuntime, k: int, cache: TeacherCache | None = None) -> None:
        self.rt, self.k, self.cache = rt, k, cache
        self.dense_blocks = 0  # blocks the dense model ran on (the cache's misses)

    def targets(self, ids: Tensor) -> TeacherTargets:
        """Targets for token blocks `ids` ``[batch, seq]``, on their device."""
        found = [self.cache.load(row) if self.cache is not None else None for row in ids]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            fresh = dense_targets(self.rt, ids[missing], self.k)
            self.dense_blocks += len(missing)
            for j, i in enumerate(missing):
                found[i] = TeacherTargets(fresh.logprobs[j], fresh.ids[j], fresh.rest[j])
                if self.cache is not None:
                    self.cache.store(ids[i], found[i])
        return TeacherTargets.stack(found).to(ids.device)  # type: ignore[arg-type]
