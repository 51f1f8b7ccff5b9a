"""The `fastgpt` command: prepare, train, sample, tune, verify, info.

User mistakes end in one line on stderr and a non-zero exit, never a traceback. Parsing
and validating the config import neither torch nor the other heavy packages (--help and
mistakes answer at once); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import os
import platform
import sys
from pathlib import Path

from fastgpt import FastGPTError, __version__
from fastgpt.config import (FIELD_HELP, PRESETS, TrainConfig, check_seed, field_types,
                            make_config, parse_value)
from fastgpt.rundir import RunDir


class _Parser(argparse.ArgumentParser):
    """One-line errors that guess what a mistyped name meant and point at the command's
    --help; no option is taken for a prefix of another (--max_step is not --max_steps).
    value_options: the options that take a value (add_argument's)."""

    def __init__(self, *args, **kwargs):
        self.value_options: set[str] = set()  # before argparse adds --help
        self.commands = None  # add_subparsers' action, if any
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        # argparse has the top parser report a command's unknown options; the command does here
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(namespace, self.commands.dest) if self.commands else None
            parser = self.commands.choices[command] if command else self
            parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                         f"{parser._guess_options(unknown)}")
        return namespace

    def _guess_options(self, unknown: list[str]) -> str:
        """'; did you mean --max_steps?' for the options among `unknown` close to known ones."""
        guesses = {}  # mistyped option -> the closest known one
        for option in (arg.split("=")[0] for arg in unknown if arg.startswith("--")):
            close = difflib.get_close_matches(option, list(self._option_string_actions), n=1)
            if close:
                guesses[option] = close[0]
        if len(guesses) == 1:
            return f"; did you mean {next(iter(guesses.values()))}?"
        if guesses:
            return f"; did you mean {', '.join(f'{g} (for {o})' for o, g in guesses.items())}?"
        return ""

    def _check_value(self, action: argparse.Action, value) -> None:
        """argparse's (private) check of a value against the choices (--preset, the
        command's name), with a guess at a mistyped one."""
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(str(value), list(action.choices), n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{guess} (choose from {choices})")

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.nargs != 0:  # not a flag (store_true, --help, --version)
            self.value_options.update(action.option_strings)
        return action

    def error(self, message: str):  # argparse's default prints the whole usage first
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _is_negative_number(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def _join_negative_values(argv: list[str], value_options: set[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3` for each option that takes a value. argparse takes only
    tokens like -3 and -.5 for negative numbers; -1e-3, -3., -inf look like options to it."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] == "--":
            return joined + argv[i:]
        if (argv[i] in value_options and i + 1 < len(argv)
                and _is_negative_number(argv[i + 1])):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default="seed",
                        help="starting config (default: seed, the chapter's); fields below override it")
    group = parser.add_argument_group("config fields (each overrides the preset)")
    defaults = TrainConfig()
    for field, kind in field_types().items():
        flags = [f"--{field}"] + ([f"--{field.replace('_', '-')}"] if "_" in field else [])
        # a bool field alone (--compile) means true; --compile false works too
        bare = dict(nargs="?", const="true") if kind is bool else {}
        action = group.add_argument(
            *flags, dest=f"cfg_{field}", metavar=kind.__name__.upper(), **bare,
            help=f"{FIELD_HELP[field]} (seed: {getattr(defaults, field)!r})")
        parser.value_options.update(action.option_strings)  # a group's, not the parser's


def _overrides(args: argparse.Namespace) -> dict:
    return {field: parse_value(field, getattr(args, f"cfg_{field}"))
            for field in field_types() if getattr(args, f"cfg_{field}") is not None}


@contextlib.contextmanager
def _importing():
    """Python's cyclic garbage collector paused while a command imports torch and the rest:
    those imports make ~340k objects that live as long as the process, and the full
    collections they set off (about 9, each walking all of them) cost ~0.9 s of a ~6 s
    start on a 2-core machine; one collects them after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _config(args: argparse.Namespace) -> TrainConfig:
    return make_config(args.preset, _overrides(args))


def cmd_prepare(args: argparse.Namespace) -> int:
    config = _config(args)
    with _importing():
        from fastgpt.corpus import load_corpus  # no torch: ~500 MB less resident memory
        from fastgpt.token_cache import prepare
        from fastgpt.tokenizer import Tokenizer

    corpus = load_corpus(config.corpus)
    tokenizer = Tokenizer.load(config.tokenizer) if config.tokenizer else None
    data = prepare(corpus, config.vocab_size, config.data_dir or None, tokenizer,
                   tokenizer_train_bytes=config.tokenizer_train_bytes)
    meta = data.meta
    print(f"corpus {meta['corpus']} (sha256 {meta['corpus_sha256']}), "
          f"{meta['corpus_chars']:,} characters -> {meta['n_tokens']:,} tokens "
          f"({meta['corpus_chars'] / max(meta['n_tokens'], 1):.2f} characters per token) in "
          f"{len(meta['shards'])} shard(s) of {meta['dtype']}; train {meta['n_train']:,}, "
          f"val {meta['n_val']:,} (the last 10%); cache {data.directory}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.resume:  # the config comes from the checkpoint, read below
        runs_dir = overrides.pop("runs_dir", TrainConfig.runs_dir)
        name = overrides.pop("name", args.preset)
    else:
        config = make_config(args.preset, overrides)
        runs_dir, name = config.runs_dir, config.name
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone takes the lock
        RunDir(Path(runs_dir) / name).check_not_in_use()  # before torch's seconds of import
    with _importing():
        from fastgpt.train import resume_config, train

    if args.resume:
        config = resume_config(runs_dir, name, overrides)
    train(config, resume=args.resume)
    return 0


def _check_utf8(text: str, flag: str) -> None:
    """Refuse an argument that was not UTF-8: argv's bytes that are not reach Python as
    surrogate escapes (byte b as U+DC00 + b), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        offset = len(text[:exc.start].encode("utf-8"))
        raise FastGPTError(f"{flag} is not UTF-8 text (byte 0x{ord(text[exc.start]) & 0xFF:02x} "
                           f"at offset {offset}); pass it in UTF-8") from None


def cmd_sample(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    _check_utf8(args.prompt, "--prompt")
    if args.checkpoint:
        path = Path(args.checkpoint)
    elif args.run:
        run_dir = Path(args.runs_dir) / args.run
        path = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    else:
        raise FastGPTError("say what to sample from: --run NAME (runs/NAME/best.pt) "
                           "or --checkpoint PATH")
    with _importing():
        from fastgpt.sample import sample_from_checkpoint

    texts = sample_from_checkpoint(
        str(path), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        num_samples=args.num_samples, device=args.device, kv_cache=not args.no_kv_cache,
        log=lambda line: print(line, file=sys.stderr))
    print("\n---\n".join(texts))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = _config(args)
    with _importing():
        from fastgpt import tune
        from fastgpt.distributed import pick_device

    device = pick_device(config.device)
    print(f"measuring the ops of a {args.preset} step on {device} (each implementation "
          f"that can run here: forward + backward, AdamW's step; median of a few calls)")
    choices = tune.choose_backends(config, device, config.batch_size, print, remeasure=True)
    if not choices:
        named = config.backend or os.environ.get("FASTGPT_BACKEND")
        print(f"nothing to measure: the backend {named!r} names every op's implementation")
        return 0
    for line in tune.table(choices):
        print(line)
    print(f"saved: `fastgpt train` with these shapes on this machine runs "
          f"{tune.backend_spec(config, choices)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _importing():
        from fastgpt.verify import verify

    return verify()


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    with _importing():
        import torch

        from fastgpt import ops

    print(f"fastgpt    {__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    for package in ("triton", "numpy", "tokenizers"):
        print(f"{package:<10} {_version(package)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"device     cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print(f"device     cpu ({torch.get_num_threads()} threads); no CUDA GPU visible")
    print("ops (backend fused: fastgpt's kernels; torch: PyTorch's own ops; the reference "
          "is always available):")
    available = ops.available()
    width = max(map(len, available)) + len(" fused")
    for op, (ok, why) in available.items():
        for impl, (runs, what) in (("fused", (ok, why)), ("torch", ops.torch_status(op))):
            print(f"  {op + ' ' + impl:<{width}} {'available' if runs else 'unavailable'}: {what}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = ops.dispatch.ChoiceCache(ops.dispatch.choice_cache_path(), device, print)
    here = cache.here()
    print(f"auto's measured choices on this machine ({cache.path}): "
          + ("none yet (`fastgpt tune` or a `fastgpt train` with auto measures them)"
             if not here else ""))
    for choice in here:
        print(f"  {choice.describe().replace(' [cached]', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgpt", description="Train a small GPT; fused kernels with "
                     "pure-PyTorch reference ops.")
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prepare = commands.add_parser("prepare", help="train the tokenizer and cache the tokens")
    _add_config_flags(prepare)
    prepare.set_defaults(func=cmd_prepare)

    train = commands.add_parser("train", help="train a GPT (the chapter's loop)")
    _add_config_flags(train)
    train.add_argument("--resume", action="store_true",
                       help="continue runs/NAME/last.pt (NAME: --name, else the preset's name)")
    train.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--run", help="run name: samples from runs/RUN/best.pt (else last.pt)")
    sample.add_argument("--runs_dir", "--runs-dir", default="runs")
    sample.add_argument("--checkpoint", help="a checkpoint file (instead of --run)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=1.0, help="0 = always the likeliest")
    sample.add_argument("--top_k", "--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=1337)
    sample.add_argument("--num_samples", "--num-samples", type=int, default=1)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--no_kv_cache", "--no-kv-cache", action="store_true",
                        help="recompute the whole window for every token (slower; the same "
                             "tokens)")
    sample.set_defaults(func=cmd_sample)

    tune = commands.add_parser("tune", help="measure which implementation of each op is "
                               "fastest at a config's shapes on this machine (what `auto` runs)")
    _add_config_flags(tune)
    tune.set_defaults(func=cmd_tune)

    verify = commands.add_parser("verify", help="check the fused kernels against the "
                                 "reference ops on this machine (exit 1 on any failure)")
    verify.set_defaults(func=cmd_verify)

    info = commands.add_parser("info", help="versions, device, and which kernels can run")
    info.set_defaults(func=cmd_info)
    for command in commands.choices.values():
        parser.value_options |= command.value_options
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_join_negative_values(argv, parser.value_options))
    try:
        return args.func(args)
    except FastGPTError as exc:
        print(f"fastgpt: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreadable corpus, unwritable runs_dir or cache, full disk...
        print(f"fastgpt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastgpt: interrupted", file=sys.stderr)
        return 130
