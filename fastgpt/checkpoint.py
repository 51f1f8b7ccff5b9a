"""Checkpoints: written atomically, read with torch.load(weights_only=True) so that loading a
checkpoint can never run code, and checked against the checksum stored in them; which one
a run directory resumes from, and the RNG states they carry.

A checkpoint is a dict of tensors and plain Python values:
  format, step, config (TrainConfig as a dict), model, optimizer (state_dicts),
  tokenizer (its JSON), corpus ({"name", "sha256"}), rng (see `rng_state`),
  data_position (see data.BatchStream), best_val_loss, evals_since_best, tokens_seen,
  checksum ({"algorithm", "value"}: see `checksum`; absent from checkpoints of a fastgpt
  before it, which load with a warning)
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from fastgpt import FastGPTError, distributed
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig
from fastgpt.fileio import atomic_open, write_atomic
from fastgpt.model import GPT
from fastgpt.optim import param_groups
from fastgpt.rundir import RunDir
from fastgpt.tokenizer import Tokenizer

CHECKPOINT_FORMAT = 1  # the checksum key is additive: older fastgpt reads these files too
REQUIRED_KEYS = ("format", "step", "config", "model", "tokenizer")
CHECKSUM_ALGORITHM = "crc32"  # see checksum() for why


def _warn(message: str) -> None:
    print(f"fastgpt: warning: {message}", file=sys.stderr)


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write `checkpoint` (tensors moved to the CPU, "format" and "checksum" added; any
    "checksum" in it is recomputed) atomically to `path`. A failed write is a one-line
    FastGPTError, and the file at `path` is then as it was."""
    path = Path(path)
    contents = _to_cpu({"format": CHECKPOINT_FORMAT,
                        **{k: v for k, v in checkpoint.items() if k != "checksum"}}, {})
    contents["checksum"] = {"algorithm": CHECKSUM_ALGORITHM,
                            "value": checksum(contents, CHECKSUM_ALGORITHM)}
    existed = path.is_file()
    try:
        with atomic_open(path) as f:
            torch.save(contents, f)
    except (OSError, RuntimeError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        previous = (f"the previous {path.name} is intact" if existed
                    else f"there was no previous {path.name}")
        raise FastGPTError(f"could not write {path} ({reason}): {previous}") from None


def load_checkpoint(path: str | Path, log: Callable[[str], None] = _warn) -> dict:
    """Load a checkpoint onto the CPU, verify its checksum and sanity-check it; any problem
    is a one-line FastGPTError (for a damaged last.pt, saying whether the best.pt beside it
    is intact). A checkpoint without a checksum (an older fastgpt's) loads, and `log` gets
    a one-line warning."""
    path = Path(path)
    try:
        checkpoint, verified = _load(path)
    except _Damaged as exc:
        raise FastGPTError(f"{exc}{_about_best(path)}") from None
    if not verified:
        log(f"{path} carries no checksum (an older fastgpt wrote it), so it could not be "
            f"checked for damage")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint"
                          ) -> tuple[GPT, TrainConfig, Tokenizer]:
    """Rebuild the model (weights loaded, on the CPU), its config and its tokenizer."""
    try:
        config = TrainConfig.from_dict(checkpoint["config"])
        config.validate()
        model = GPT(**config.model_kwargs())
        model.load_state_dict(checkpoint["model"])
    except (FastGPTError, TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise FastGPTError(f"{path} does not fit this fastgpt's GPT ({reason[:200]})") from None
    return model, config, Tokenizer.from_json(checkpoint["tokenizer"])


# --- a run directory's checkpoints --------------------------------------------------------


def check_new_run(run: RunDir) -> None:
    """Raise when `run` already holds a run (a new run would overwrite it)."""
    found = run.markers()
    if not found:
        return
    if "last.pt" in found:
        how = "continue it with --resume"
    elif "best.pt" in found:
        how = (f"it has best.pt but no last.pt: to continue from best.pt, copy it "
               f"(cp {run.best} {run.last}) and use --resume")
    else:
        how = "it stopped before its first checkpoint: delete the directory to start over"
    raise FastGPTError(f"{run.directory} already holds a run ({', '.join(found)}); {how}, "
                       f"or start another with --name NEW_NAME")


def check_resumable(run: RunDir) -> None:
    """Raise, saying how to go on, when `run` has no last.pt to resume."""
    if run.last.is_file():
        return
    if run.best.is_file():
        raise FastGPTError(f"--resume: {run.directory} has best.pt but no last.pt; to continue "
                           f"from best.pt, copy it (cp {run.best} {run.last}) and resume again")
    if run.markers():
        raise FastGPTError(f"--resume: {run.directory} has no checkpoint (its run stopped "
                           f"before writing one); delete it and start again without --resume")
    raise FastGPTError(f"--resume: there is no checkpoint at {run.last}; "
                       f"start the run without --resume")


def load_resumable(run: RunDir, log: Callable[[str], None] = _warn,
                   config: TrainConfig | None = None) -> dict:
    """`run`'s last.pt, loaded, which must belong to `run` (see _check_belongs) and, given
    `config`, have its model shape, weight decay groups and tokenizer settings (a resumed
    run encodes with the checkpoint's tokenizer: another --tokenizer would be ignored)."""
    check_resumable(run)
    checkpoint = load_checkpoint(run.last, log=log)
    _check_belongs(checkpoint, run.last, run.config)
    fixed = ARCHITECTURE_FIELDS + ("weight_decay_all", "tokenizer", "tokenizer_train_bytes")
    for field in fixed if config is not None else ():
        then = checkpoint["config"].get(field, getattr(TrainConfig, field))  # older: default
        if then != getattr(config, field):
            raise FastGPTError(f"{run.last} was trained with {field}={then!r}; it cannot "
                               f"resume with {field}={getattr(config, field)!r}")
    return checkpoint


def write_run_info(path: Path, config: TrainConfig, corpus, tokenizer: Tokenizer,
                   **facts) -> None:
    """config.json: what the run is (its config, corpus and tokenizer, which a checkpoint
    must match to resume in its directory: see _check_belongs), and `facts` about it."""
    info = {"config": config.to_dict(), "corpus": corpus.name, "corpus_sha256": corpus.sha256,
            "tokenizer_sha256": tokenizer.sha256, **facts, "torch": torch.__version__}
    write_atomic(path, (json.dumps(info, indent=2) + "\n").encode())


def _check_belongs(checkpoint: dict, path: Path, run_info_path: Path) -> None:
    """Raise when the checkpoint at `path` was not written by the run whose config.json is
    at `run_info_path` (a last.pt copied from another run): its model shape, corpus or
    tokenizer differ. Without a config.json (an older fastgpt's run) there is nothing to
    check against."""
    try:
        info = json.loads(run_info_path.read_text())
        run = {**{f: info["config"][f] for f in ARCHITECTURE_FIELDS},
               "corpus sha256": info["corpus_sha256"],
               "tokenizer sha256": info["tokenizer_sha256"]}
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, KeyError):
        raise FastGPTError(f"{run_info_path} is unreadable, so {path} cannot be checked against "
                           f"it; delete it to resume without that check") from None
    mine = {**{f: checkpoint["config"].get(f) for f in ARCHITECTURE_FIELDS},
            "corpus sha256": checkpoint.get("corpus", {}).get("sha256"),
            "tokenizer sha256": Tokenizer.from_json(checkpoint["tokenizer"]).sha256}
    differ = [key for key in run if mine[key] != run[key]]
    if differ:
        said = "; ".join(f"{key} {_short(mine[key])}, not {_short(run[key])}" for key in differ)
        raise FastGPTError(f"{path} does not belong to {path.parent}: it has {said} as its "
                           f"config.json says (copied from another run?); resume it in the "
                           f"directory of the run that wrote it")


def _short(value) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 12 else str(value)


def restore_training(checkpoint: dict, path: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """The model's weights and the optimizer's state from `checkpoint` (read from `path`),
    with this run's hyperparameters (which a resume may override): betas, eps, decay."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise FastGPTError(f"{path} does not fit this run ({reason})") from None
    for group, decay in zip(optimizer.param_groups, param_groups(
            model, config.weight_decay, config.weight_decay_all)):
        group.update(betas=(config.beta1, config.beta2), eps=config.eps,
                     weight_decay=decay["weight_decay"])


# --- a run's RNG state -------------------------------------------------------------------


def rng_state(ctx: distributed.Context, device: torch.device) -> dict:
    """This process's RNG states ("torch", "cuda"). In a distributed run: rank 0's at the
    top level (what a single process resumes with) and every rank's under "ranks"."""
    cuda = None
    if device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)] if ctx.enabled else torch.cuda.get_rng_state_all()
    mine = {"torch": torch.get_rng_state(), "cuda": cuda}
    if not ctx.enabled:
        return mine
    ranks = distributed.all_gather(ctx, mine)
    return {**ranks[0], "ranks": ranks}


def restore_rng(rng: dict, ctx: distributed.Context, device: torch.device, fresh_seed: int,
                log: Callable[[str], None] = _warn) -> None:
    """Each rank takes back its own RNG state when the checkpoint has one for it (same
    number of ranks); else rank 0 takes the top-level state and the others `fresh_seed`."""
    ranks = rng.get("ranks")
    same_ranks = ranks is not None and len(ranks) == ctx.world_size
    saved_by = len(ranks) if ranks else 1
    if ctx.enabled and saved_by != ctx.world_size:
        log(f"the checkpoint was written by {saved_by} process(es), this run has "
            f"{ctx.world_size}: ranks other than 0 draw fresh dropout randomness")
    mine = ranks[ctx.rank] if ctx.enabled and same_ranks else rng if ctx.is_main else None
    if mine is None:
        torch.manual_seed(fresh_seed)
        return
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"] is not None:
        if ctx.enabled:
            torch.cuda.set_rng_state(mine["cuda"][0], device)
        else:
            torch.cuda.set_rng_state_all(mine["cuda"])


def checksum(checkpoint: dict, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Hex digest of everything in `checkpoint` but its "checksum" key: a walk that feeds
    the hash each tensor's dtype, shape and bytes and each plain value in a canonical form.
    A dict's keys are walked sorted, so its insertion order does not count; the order of a
    list or tuple does.

    crc32 because its job is accidental damage (bytes flipped, zeroed or lost on a disk or a
    copy; a random change escapes it with odds 2**-32), not tampering, and it costs half of
    sha256. On the seed model's checkpoint (11.1M parameters + AdamW state, 134 MB; the
    2-core CI machine, warm page cache, median of 9, 2026-12-04) the walk takes ~35 ms
    (sha256: ~80 ms), against ~120 ms for torch.save and ~45 ms for torch.load; a whole
    save_checkpoint (fsyncs included) takes ~210 ms, a load_checkpoint ~70 ms."""
    hasher = _HASHES[algorithm]()
    _feed(hasher, {k: v for k, v in checkpoint.items() if k != "checksum"})
    return hasher.hexdigest()


class _Damaged(FastGPTError):
    """A file whose bytes are damaged (as opposed to a foreign or refused one)."""


def _load(path: Path) -> tuple[dict, bool]:
    """The checkpoint at `path`, and whether it carried a checksum (which matched)."""
    if not path.is_file():
        raise FastGPTError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles: the error says enough
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file can make torch.load raise almost anything
        code = _refused_global(exc)
        if code is not None:
            raise FastGPTError(
                f"{path} was refused: it holds Python objects that would run code when "
                f"loaded{code}, so it is not a fastgpt checkpoint (fastgpt loads checkpoints "
                f"with weights_only=True)") from None
        raise _Damaged(f"{path} is not a readable fastgpt checkpoint (corrupt or truncated: "
                       f"{_unreadable(path, exc)}); it was refused") from None
    if not isinstance(checkpoint, dict):
        raise FastGPTError(f"{path} is not a fastgpt checkpoint (it holds a "
                           f"{type(checkpoint).__name__}, not a dict)")
    if "format" in checkpoint and checkpoint["format"] != CHECKPOINT_FORMAT:
        # before the checksum: another format may compute it differently
        raise FastGPTError(f"{path} has checkpoint format {checkpoint['format']!r}; this "
                           f"fastgpt reads format {CHECKPOINT_FORMAT}")
    stored = checkpoint.get("checksum")
    if stored is not None:
        if not (isinstance(stored, dict) and isinstance(stored.get("algorithm"), str)
                and isinstance(stored.get("value"), str)):
            raise _Damaged(f"{path} is corrupt: its checksum entry is malformed; it was not used")
        if stored["algorithm"] not in _HASHES:
            raise FastGPTError(f"{path} carries a checksum of a kind this fastgpt does not know "
                               f"({stored['algorithm'][:40]!r}); it was not used")
        try:
            intact = checksum(checkpoint, stored["algorithm"]) == stored["value"]
        except TypeError:  # a value that save_checkpoint never writes
            intact = False
        if not intact:
            raise _Damaged(f"{path} is corrupt: its contents do not match the checksum stored "
                           f"in it; it was not used")
    if any(k not in checkpoint for k in REQUIRED_KEYS):
        raise FastGPTError(f"{path} is not a fastgpt checkpoint (missing model, config or tokenizer)")
    return checkpoint, stored is not None


def _about_best(path: Path) -> str:
    """For a damaged last.pt: whether the best.pt beside it can be continued from."""
    if path.name != "last.pt":
        return ""
    best = path.with_name("best.pt")
    if not best.is_file():
        return "; there is no best.pt beside it"
    try:
        checkpoint, verified = _load(best)
    except FastGPTError:
        return f"; {best} is damaged too"
    how = f"to continue from it, copy it over last.pt (cp {best} {path}) and resume"
    if not verified:
        return (f"; {best} (step {checkpoint['step']}) loads but carries no checksum, so it "
                f"could not be checked: {how}")
    return f"; {best} (step {checkpoint['step']}) is intact: {how}"


def _refused_global(exc: Exception) -> str | None:
    """When weights_only refused what the file would run (a global, a call), " (NAME)" or
    ""; else None."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    text = str(exc)
    named = re.search(r"GLOBAL (\S{1,100})", text)
    if named:
        return f" ({named.group(1)})"
    if re.search(r"call reduce for unrecognized function|Can only (create new object|build )",
                 text):
        return ""
    return None


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch could not read `path`, short, in one line, without torch's advice (which
    is to load it with weights_only=False)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04":
        return "not a zip archive, which torch.save writes"
    # torch wraps its unpickler's error in paragraphs of advice: keep the paragraph without
    for paragraph in str(exc).split("\n\n"):
        sentence = re.split(r"(?<=\.)\s|\n", paragraph.strip())[0].strip().rstrip(".")
        if sentence and not re.search(r"weights.only|Re-running|False", sentence, re.I):
            return sentence if len(sentence) <= 120 else sentence[:119] + "…"
    return type(exc).__name__


def _write_failure(exc: BaseException) -> str | None:
    """The reason, in a few words, when `exc` is a failed write; else None."""
    # torch.save's zip writer turns the OSError of a failed write (ENOSPC, EFBIG) into a
    # RuntimeError such as "unexpected pos 768 vs 662", raised while handling it
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    # writing to a path, its own writer says "[enforce fail at inline_container.cc:NNN] .
    # PytorchStreamWriter failed writing file data/3: file write failed"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, RuntimeError) and re.search(r"StreamWriter failed|write failed", text):
        return text.rsplit(":", 1)[-1].strip() or "write failed"
    return None


def _to_cpu(value, moved: dict):
    """`value` with every tensor on the CPU; containers without a CUDA tensor are returned as
    they are (a state_dict keeps its _metadata), a tensor seen twice is moved once."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value
        if id(value) not in moved:
            moved[id(value)] = value.cpu()
        return moved[id(value)]
    if isinstance(value, dict):
        items = {k: _to_cpu(v, moved) for k, v in value.items()}
        if all(items[k] is value[k] for k in value):
            return value
        result = copy.copy(value)  # the same type, attributes too (a state_dict's _metadata)
        result.update(items)
        return result
    if isinstance(value, (list, tuple)):
        items = [_to_cpu(v, moved) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return items if isinstance(value, list) else type(value)(items)
    return value


class _Crc32:
    """zlib.crc32 with hashlib's interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


_HASHES = {"crc32": _Crc32, "sha256": hashlib.sha256}


def _feed(hasher, value) -> None:
    """Feed `value` to `hasher` unambiguously: a type tag, then a length or count where
    the size varies."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().resolve_conj().resolve_neg()
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise TypeError(f"a checkpoint cannot hold a {tensor.layout} tensor")
        hasher.update(b"T" + _plain(str(tensor.dtype)) + _plain(tuple(tensor.shape)))
        # as bytes: bfloat16 has no numpy dtype, and bytes compare nan and -0.0 exactly
        hasher.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        hasher.update(b"d" + struct.pack("<Q", len(value)))
        for key, item in sorted(((_plain(k), v) for k, v in value.items()),
                                key=lambda pair: pair[0]):
            hasher.update(key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update((b"l" if isinstance(value, list) else b"t") + struct.pack("<Q", len(value)))
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(_plain(value))


def _plain(value) -> bytes:
    """A plain value (or a tuple of them) as bytes that no other value has."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"B1" if value else b"B0"
    if isinstance(value, (int, str, bytes)):
        data = (str(int(value)).encode() if isinstance(value, int)
                else value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
        tag = b"i" if isinstance(value, int) else b"s" if isinstance(value, str) else b"b"
        return tag + struct.pack("<Q", len(data)) + data
    if isinstance(value, float):
        return b"f" + struct.pack("<d", value)  # the exact bits: inf, nan, -0.0 included
    if isinstance(value, (torch.dtype, torch.device)):
        return b"o" + _plain(f"{type(value).__name__}:{value}")
    if isinstance(value, tuple):
        return b"t" + struct.pack("<Q", len(value)) + b"".join(_plain(v) for v in value)
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")
