"""ShareGPT: either conversations (JSON / JSON lines / a Hugging Face dataset id) turned into per-turn
(prompt, output) token lengths, or a file of per-turn token counts such as the shipped Sarathi-Serve one.

Each assistant reply is one request: its prompt is the whole conversation before it (history included, as a
serving system sees it), its output the reply. Turns of one conversation form one prefix group: a turn's
prompt is a prefix of the next turn's prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import USER_LICENCE, Trace, user_file
from packinfer_bench.traces.limits import MAX_COUNT, check_int
from packinfer_bench.traces.tabular import (
    iter_json_lines,
    iter_json_list,
    parse_ints,
    read_csv_columns,
    read_header,
    read_text_start,
    require_positive,
)

COUNT_COLUMNS = ["num_prefill_tokens", "num_decode_tokens"]
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "model"}
HF_PREFIX = "hf:"
_PIECES = re.compile(r"\w+|[^\w\s]")


def sniff(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return set(COUNT_COLUMNS) <= {h.strip() for h in read_header(path)}
    if suffix in (".json", ".jsonl"):
        return '"conversations"' in read_text_start(path)[:1 << 16]
    return False


def check_options(options: dict, error) -> None:
    """tokenizer: a Hugging Face tokenizer name (or, from Python, a callable); max_conversations: how many
    conversations to read; data_files: for hf: datasets."""
    tok = options.get("tokenizer")
    if tok is not None and not callable(tok) and (not isinstance(tok, str) or not tok.strip()):
        raise error("tokenizer", f"expected a tokenizer name (str), got {tok!r:.80} ({type(tok).__name__})")
    if options.get("max_conversations") is not None:
        check_int(options["max_conversations"], "max_conversations", 1, MAX_COUNT,
                  "conversations read from the file", error)
    files = options.get("data_files")
    if files is not None and not isinstance(files, str):
        raise error("data_files", f"expected str, got {files!r:.80} ({type(files).__name__})")


def load(path: Path | str, *, name: str, tokenizer: str | Callable[[str], int] | None = None,
         max_conversations: int | None = None, data_files: str | None = None) -> Trace:
    """Load counts (CSV) or conversations (JSON, JSONL, or `hf:OWNER/NAME` through `datasets`)."""
    check_options({"tokenizer": tokenizer, "max_conversations": max_conversations, "data_files": data_files},
                  lambda key, detail: TraceError(f"trace {name!r}: {key}: {detail}"))
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        records = _hub_records(path[len(HF_PREFIX):], data_files)
        return _from_conversations(records, name, str(path), tokenizer, max_conversations)
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if tokenizer is not None:
            raise TraceError(f"{path}: a token-count file cannot be re-tokenized (tokenizer={tokenizer!r}); "
                             "give the conversations file instead")
        return _from_counts(path, name)
    return _from_conversations(_file_records(path), name, str(path), tokenizer, max_conversations)


def _from_counts(path: Path, name: str) -> Trace:
    cols, lines = read_csv_columns(path, COUNT_COLUMNS)
    prompt = parse_ints(cols["num_prefill_tokens"], path, lines, "num_prefill_tokens")
    output = parse_ints(cols["num_decode_tokens"], path, lines, "num_decode_tokens")
    require_positive(prompt, path, lines, "num_prefill_tokens")
    require_positive(output, path, lines, "num_decode_tokens")
    tok = "llama-2 (counts shipped in the file)" if "llama2" in path.name else "unknown (counts shipped in the file)"
    return Trace(name=name, kind="sharegpt", requests=pd.DataFrame({"prompt_len": prompt, "output_len": output}),
                 source=user_file("sharegpt token counts"), licence=USER_LICENCE, tokenizer=tok, path=str(path),
                 notes={"format": "counts", "arrivals": "none: replay with a rate"})


def _file_records(path: Path) -> Iterable[tuple[str, dict]]:
    if path.suffix.lower() == ".jsonl":
        return ((f"{path}:{line}", obj) for line, obj in iter_json_lines(path))
    return ((f"{path}:{line}", obj) for line, obj in iter_json_list(path))


def _hub_records(dataset_id: str, data_files: str | None) -> Iterable[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise TraceError("loading a Hugging Face dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(dataset_id, data_files=data_files, split="train")
    except Exception as e:  # noqa: BLE001  (offline, unknown id, bad data_files: all user-fixable)
        raise TraceError(f"could not load Hugging Face dataset {dataset_id!r} (data_files={data_files!r}): {e}; "
                         "when offline, download it and pass the local file path") from None
    return ((f"{dataset_id} record {i}", rec) for i, rec in enumerate(ds))


def _counter(tokenizer: str | Callable[[str], int] | None) -> tuple[Callable[[str], int], str]:
    if tokenizer is None:
        approximate = "approximate: word and punctuation pieces (no tokenizer given)"
        return (lambda text: len(_PIECES.findall(text))), approximate
    if callable(tokenizer):
        return tokenizer, getattr(tokenizer, "__name__", "custom callable")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TraceError(f"tokenizer {tokenizer!r} needs the 'transformers' package") from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as e:  # noqa: BLE001  (unknown name, offline: the user's to fix)
        raise TraceError(f"could not load tokenizer {tokenizer!r}: {e}") from None
    return (lambda text: len(tok.encode(text, add_special_tokens=False))), tokenizer


def _from_conversations(records: Iterable[tuple[str, dict]], name: str, source: str,
                        tokenizer: str | Callable[[str], int] | None, max_conversations: int | None) -> Trace:
    count, tok_label = _counter(tokenizer)
    prompt, output, group, skipped, conversations = [], [], [], 0, 0
    for where, rec in records:
        if max_conversations is not None and conversations >= max_conversations:
            break
        if not isinstance(rec, dict):
            raise TraceError(f"{where}: expected a conversation (a JSON object with a 'conversations' list), got "
                             f"{rec!r:.80}")
        turns = rec.get("conversations")
        if not isinstance(turns, list):
            raise TraceError(f"{where}: expected a 'conversations' list, got {type(turns).__name__}")
        history = 0
        for turn in turns:
            if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
                raise TraceError(f"{where}: each turn needs 'from' and 'value', got {turn!r:.80}")
            tokens = count(str(turn["value"]))
            role = str(turn["from"]).lower()
            if role in ASSISTANT_ROLES:
                if history > 0 and tokens > 0:
                    prompt.append(history)
                    output.append(tokens)
                    group.append(conversations)
                else:
                    skipped += 1
            history += tokens
        conversations += 1
    if not prompt:
        where = source if source.startswith(HF_PREFIX) else f"{source}:1"  # the whole file
        raise TraceError(f"{where}: no usable (prompt, reply) turns in {conversations} conversation(s): a reply needs "
                         "a non-empty turn before it")
    requests = pd.DataFrame({"prompt_len": prompt, "output_len": output, "prefix_id": group})
    requests = _turn_prefixes(requests)
    hub = source.startswith(HF_PREFIX)
    return Trace(name=name, kind="sharegpt", requests=requests,
                 source=f"Hugging Face dataset {source}" if hub else user_file("sharegpt conversations"),
                 licence="see the dataset's card" if hub else USER_LICENCE, tokenizer=tok_label, path=source,
                 notes={"format": "conversations", "conversations": conversations, "skipped_turns": skipped,
                        "arrivals": "none: replay with a rate"})


def _turn_prefixes(requests: pd.DataFrame) -> pd.DataFrame:
    """Within a conversation turn k's prompt is a prefix of turn k+1's, so every turn but the last shares its
    whole prompt, and the last shares the previous turn's prompt. Single-turn conversations share nothing."""
    gid = requests["prefix_id"]
    nxt_same = gid.shift(-1) == gid
    prev_same = gid.shift(1) == gid
    prefix = np.where(nxt_same, requests["prompt_len"], np.where(prev_same, requests["prompt_len"].shift(1), 0))
    requests["prefix_len"] = prefix.astype(np.int64)
    requests["prefix_id"] = np.where(nxt_same | prev_same, gid, -1)
    return requests
