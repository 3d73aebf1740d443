"""The data pipeline: validation before training, tokenized batches, and a resumable order.

Order: each epoch visits every sample once in a permutation drawn from (seed, epoch). The permutation
is cut into windows of `batch_size * WINDOW_BATCHES` samples; each window is sorted by the byte length
of its lines (known from the offset index, no tokenizing needed), cut into batches of similar length,
and the batch order inside the window is shuffled with an RNG drawn from (seed, epoch, window). The
state is (epoch, window, batches taken in the window), so a restored stream yields exactly the batches
the uninterrupted one would have. Streaming reads rows through the offset index on demand;
non-streaming parses every row up front; both yield identical batches.

Packing (cpt by default): documents, in the epoch's permutation, are joined (each ends with EOS) and
cut into max_seq_length blocks; the state is (epoch, document, token offset in it).
"""
from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Any, Callable

import numpy as np

from overnight.backend import Batch
from overnight.backend.objectives import PAIRED
from overnight.data.source import BatchSource
from overnight.data.formats import (
    METHOD_FORMATS,
    DataError,
    DataReport,
    FileReport,
    FileStamp,
    Measure,
    Problem,
    changed_file_error,
    check_file,
    checked_stamp,
    detect_format,
    empty_fix,
    find_data_files,
    iter_lines,
    key_text,
    label_of,
    line_content,
    line_number_at,
    method_needs,
    no_target_fix,
    parse_line,
    row_problems,
    stamp_of,
    validate_data_command,
    where,
)
from overnight.data.tokenizer import (
    Encoded,
    TextTokenizer,
    encode_prompt,
    encode_row,
    fit,
    load_tokenizer,
    prompts_use_chat_template,
    shortest_trainable_length,
    target_tokens,
)

__all__ = [
    "Batch", "DataError", "DataReport", "FileReport", "Problem", "TextTokenizer", "TrainStream",
    "check_data", "eval_batches", "find_data_files", "load_tokenizer", "prediction_prompts",
]

WINDOW_BATCHES = 32  # batches per length-bucketing window
STATE_VERSION = 1
PAIRED_METHODS = PAIRED  # preference pairs (objectives.PAIRED): row 2i chosen, 2i+1 rejected
_EVAL_STREAM = 0x5EED_E7A1  # keeps the eval subset's RNG apart from the training order's


def _round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFF_FFFF_FFFF_FFFF for k in keys])


# ---------------------------------------------------------------------------
# Validation

def _hint_sets(cfg, method: str) -> tuple[str, ...]:
    """grpo.rewards for a grpo run: validate-data refuses grpo without one, so a hint without it checks nothing."""
    if method != "grpo" or cfg is None or not cfg.grpo.rewards:
        return ()
    return (f"grpo.rewards=[{', '.join(cfg.grpo.rewards)}]",)


def check_data(data_path: Path, method: str, *, tokenizer: TextTokenizer | None = None,
               cfg: Any = None, on_progress: Callable[[Path, int, int, int], None] | None = None) -> DataReport:
    """One full validating pass over the train and validation files; collects every problem.

    With a tokenizer, every row is also tokenized and cut exactly as training will (this also runs the
    chat template on every conversation), giving token lengths, the number of rows longer than
    cfg.model.max_seq_length (2048 without a cfg), and the rows left with no target token within it;
    `report.warnings()` words those counts. A file where more than half the rows (or all) would train
    nothing is refused. `report.raise_if_problems()` raises one DataError listing the problems."""
    if method not in METHOD_FORMATS:
        raise DataError(f"unknown method '{method}' -> use one of {', '.join(METHOD_FORMATS)}")
    train, val = find_data_files(Path(data_path), cfg.data.columns if cfg is not None else None,
                                 cfg.data.hf_dataset if cfg is not None else None)
    max_len = cfg.model.max_seq_length if cfg is not None else 2048
    mask_prompt = cfg.data.mask_prompt if cfg is not None else True
    truncate = cfg.data.truncate if cfg is not None else True
    packing = bool(cfg.packing) if cfg is not None else method == "cpt"

    measure = None if tokenizer is None else _token_measure(tokenizer, method, max_len, mask_prompt, truncate,
                                                            packing, cfg)
    reports = [check_file(path, method, measure, max_len, _progress_for(path, on_progress))
               for path in (train, val) if path is not None]
    report = DataReport(method, reports[0], reports[1] if len(reports) > 1 else None, max_len, truncate, packing,
                        mask_prompt, Path(data_path), tokenizer.model_dir if tokenizer is not None else None,
                        _hint_sets(cfg, method))
    for f in report.files:
        _check_file_fits(f, report, method, tokenizer, cfg)
    if packing and max_len < 2:
        report.train.add(None, None, f"model.max_seq_length={max_len} leaves packed blocks no token to predict",
                         "raise model.max_seq_length")
    if packing and method in PAIRED_METHODS + ("grpo",):
        report.train.add(None, None, f"data.packing cannot be used with method {method}",
                         "set data.packing=false (preference pairs are never packed)")
    return report


def _token_measure(tokenizer: TextTokenizer, method: str, max_len: int, mask_prompt: bool, truncate: bool,
                   packing: bool, cfg: Any = None) -> Measure:
    """check_file's ``measure``: tokenize and cut a row exactly as training will."""
    templated = method == "grpo" and prompts_use_chat_template(
        tokenizer, cfg.grpo.chat_template if cfg is not None else "auto")

    def measure(row: dict, fmt: str) -> tuple[int, int | None, int | None]:
        if fmt == "chat" and not tokenizer.has_chat_template:
            return 0, None, None  # reported once per file (_check_file_fits), not once per row
        if method == "grpo":  # a prompt: its targets are sampled during training
            return len(encode_prompt(tokenizer, row, fmt, templated)), None, None
        enc = encode_row(tokenizer, row, fmt, mask_prompt)
        if packing or (enc.length > max_len and not truncate):
            return enc.length, None, None  # packed into blocks / dropped whole: counted elsewhere
        targets = target_tokens(fit(enc, max_len))
        return enc.length, targets, None if targets else shortest_trainable_length(enc)
    return measure


def _progress_for(path: Path, on_progress: Callable[[Path, int, int, int], None] | None):
    """check_file's ``on_line`` for ``path``: on_progress(path, rows, bytes read, file size), so a large file is
    not silence."""
    if on_progress is None:
        return None
    size = path.stat().st_size if path.is_file() else 0
    shown = where(path) if label_of(path) else path  # a converted source by the name the user gave it (a str)
    return lambda rows, offset: on_progress(shown, rows, offset, size)


def _check_file_fits(f: FileReport, report: DataReport, method: str, tokenizer: TextTokenizer | None,
                     cfg: Any) -> None:
    """The problems of one file that need the whole pass: a missing chat template, lengths that leave nothing
    to train."""
    max_len, mask_prompt = report.max_seq_length, report.mask_prompt
    if tokenizer is not None and f.format == "chat" and not tokenizer.has_chat_template:
        f.add(f.format_line, "messages", f"the tokenizer in {tokenizer.model_dir} has no chat template",
              "use prompt/completion or text rows, or a model with a chat_template in tokenizer_config.json")
    if method == "grpo" and f.lengths is not None:
        # A prompt is cut from the left to leave room for the completion; one that leaves no room is refused.
        room = max_len - (cfg.grpo.max_new_tokens if cfg is not None else 64)
        if room < 1:
            f.add(None, None, f"model.max_seq_length={max_len} leaves no room for a prompt before "
                  f"grpo.max_new_tokens tokens", "raise model.max_seq_length or lower grpo.max_new_tokens")
        return
    if f.rows and f.too_long == f.rows and not report.truncate and not report.packing:
        f.add(None, None, f"every row is longer than max_seq_length={max_len} tokens and data.truncate=false "
              "drops them all", "raise model.max_seq_length or set data.truncate=true")
    # Rows whose targets all lie beyond max_seq_length train nothing (training leaves them out). A few
    # are a warning; more than half means the length is wrong for this data: refuse before the night.
    if f.no_targets and 2 * f.no_targets > f.rows:
        share = "no row has a" if f.no_targets == f.rows else \
            f"{f.no_targets} of {f.rows} rows (more than half) have no"
        masking = f" (data.mask_prompt={str(mask_prompt).lower()})" if f.format in ("chat", "completion") else ""
        f.add(f.no_target_line, None, f"{share} target token within model.max_seq_length={max_len}{masking}, "
              "so training would learn "
              f"{'nothing' if f.no_targets == f.rows else 'from less than half the data'}; this line is "
              "the first such row", no_target_fix(f, mask_prompt))


# ---------------------------------------------------------------------------
# Rows of one file

class RowSource:
    """The non-blank rows of one JSONL file, by index. Streaming keeps only each line's byte offset and
    length and reads a row when asked; otherwise every row is parsed once, up front."""

    def __init__(self, path: Path, streaming: bool, method: str | None = None):
        self.path = Path(path)
        self.method = method
        self._handle = None
        if not self.path.is_file():
            raise DataError(f"{where(self.path)}: no such file -> check data.path")
        # Typed arrays keep the index at 12 bytes a row (a Python list of ints costs several times that).
        offsets, lengths, rows = array("q"), array("i"), []
        try:
            # Streamed rows are read through this handle, opened before the index: a file replaced later (a rename)
            # is still the one indexed; one edited in place changes its stamp, which every read compares.
            self._handle = open(self.path, "rb")
            self.stamp = FileStamp.of(os.fstat(self._handle.fileno()))
            checked = checked_stamp(self.path)
            if checked is not None and checked != self.stamp:
                self.close()
                raise changed_file_error(self.path, checked, self.stamp)
            for lineno, offset, content in iter_lines(self.path):
                offsets.append(offset)
                lengths.append(min(len(content), 2**31 - 1))
                if not streaming:
                    rows.append(self._parse(content, lineno))
        except OSError as exc:
            self.close()
            raise DataError(f"{where(self.path)}: cannot be read ({exc.strerror or exc})") from None
        if not streaming:
            self.close()
        self._unchanged(stamp_of(self.path))  # edited while it was indexed
        if not offsets:
            raise DataError(f"{where(self.path)}: is empty (no rows) -> {empty_fix(self.path)}")
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.lengths = np.frombuffer(lengths, dtype=np.int32)
        self.rows = rows if not streaming else None
        first = self.row(0)
        self.format = detect_format(first)
        if self.format is None:
            raise DataError(f"{where(self.path, self.lineno(0))}: the row has none of the keys of a known format "
                            f"-> run {validate_data_command(self.path, self.method)} for details")

    def __len__(self) -> int:
        return len(self.offsets)

    def _unchanged(self, now: FileStamp | None) -> None:
        if now != self.stamp:
            raise changed_file_error(self.path, self.stamp, now)

    def lineno(self, i: int) -> int:
        self._unchanged(stamp_of(self.path))  # a line number counted in another file would point nowhere
        return line_number_at(self.path, int(self.offsets[i]))

    def _parse(self, content: bytes, lineno: int | None = None, index: int | None = None) -> dict:
        row, err = parse_line(content)
        if err:
            lineno = lineno if lineno is not None else self.lineno(index)
            raise DataError(f"{where(self.path, lineno)}: {err[0]} -> {err[1]}")
        return row

    def row(self, i: int) -> dict:
        if self.rows is not None:
            return self.rows[i]
        if self._handle is None:  # read again after close(): still the same file, or the stamp says it changed
            self._handle = open(self.path, "rb")
        offset = int(self.offsets[i])
        self._handle.seek(offset)
        raw = self._handle.readline()
        self._unchanged(FileStamp.of(os.fstat(self._handle.fileno())))
        return self._parse(line_content(raw, offset == 0), index=i)

    def checked_row(self, i: int) -> dict:
        """The row, refused with file:line if it does not fit the file's format (check_data catches this
        before training; this guards a file changed since, or a stream used without the check)."""
        row = self.row(i)
        fmt = detect_format(row)
        problems = [(None, f"row is in {fmt} format but the file is in {self.format} format", "")] \
            if fmt != self.format else row_problems(row, fmt, self.method)
        if problems:
            key, message, hint = problems[0]
            raise DataError(f"{where(self.path, self.lineno(i))}:{key_text(self.path, key)} {message}"
                            + f" -> {hint or 'run ' + validate_data_command(self.path, self.method)}")
        return row

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
            self._handle = None

    def __del__(self) -> None:
        self.close()


def _open_source(path: Path, tokenizer: TextTokenizer, cfg: Any, streaming: bool) -> RowSource:
    method = cfg.data.method
    source = RowSource(path, streaming, method)
    if source.format not in METHOD_FORMATS[method]:
        raise DataError(f"{where(path)}: rows are in {source.format} format, which method '{method}' cannot train on "
                        f"-> method {method} needs {method_needs(method)}")
    if cfg.packing and method in PAIRED_METHODS + ("grpo",):
        raise DataError(f"data.packing cannot be used with method {method} -> set data.packing=false")
    if source.format == "chat" and not tokenizer.has_chat_template:
        raise DataError(f"{where(path)}: chat rows need a chat template, and the tokenizer in {tokenizer.model_dir} "
                        "has none -> use prompt/completion or text rows")
    return source


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, max_len: int, paired: bool = False) -> Batch:
    """Right-pad to the longest row rounded up to a multiple of 8 (at most max_len rounded up)."""
    width = min(_round_up(max(len(ids) for ids, _ in seqs)), _round_up(max_len))
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(seqs), width), dtype=np.float32)
    attention_mask = np.zeros((len(seqs), width), dtype=np.int32)
    for b, (ids, mask) in enumerate(seqs):
        n = min(len(ids), width)
        input_ids[b, :n] = ids[:n]
        loss_mask[b, :n] = mask[:n]
        attention_mask[b, :n] = 1
    loss_mask[:, 0] = 0  # the first token has nothing before it to be predicted from
    return Batch(input_ids, loss_mask, attention_mask, pad_id, paired)


# ---------------------------------------------------------------------------
# Training order

def order_changes(state: dict, cfg: Any, samples_per_epoch: int) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, now)} for each way a saved TrainStream position does not fit the order this config draws
    over ``samples_per_epoch`` rows; empty when it continues that order. TrainStream.restore refuses on it, and a
    resume checks it (overnight.runs.resume) before anything is loaded or written."""
    expected = {"version": STATE_VERSION, "kind": "packed" if cfg.packing else "rows",
                "samples_per_epoch": samples_per_epoch, "batch_size": cfg.train.batch_size,
                "window_size": cfg.train.batch_size * WINDOW_BATCHES, "seed": cfg.train.seed}
    return {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}


class TrainStream(BatchSource):
    """Infinite batches over the training file, epoch after epoch, with state() / restore().

    sft/cpt: `cfg.train.batch_size` rows per batch. dpo/orpo: that many pairs, as 2*batch_size rows
    (row 2i chosen, 2i+1 rejected, targets on the response only). The last batch of an epoch may be
    smaller, so every sample is used exactly once per epoch; `epoch` is the epoch of the batch
    served last. Rows longer than max_seq_length are cut or skipped (cfg.data.truncate); `truncated`
    and `dropped` count them as they are met, and `no_targets` the rows left out because no target token
    falls within max_seq_length (they would train nothing, and a batch of only such rows would be a
    step with no target at all), while check_data(..., tokenizer=...) counts them up
    front for the warning. On out-of-memory, split the batch (Batch.split) rather than changing
    cfg.train.batch_size: the order depends on the batch size, and restore() refuses a different one."""

    prefetch = True  # a pure function of (seed, position): the loop builds the next batches on a thread

    def __init__(self, train_file: Path, tokenizer: TextTokenizer, cfg: Any):
        self.tok = tokenizer
        self.cfg = cfg
        self.method = cfg.data.method
        self.paired = self.method in PAIRED_METHODS
        self.packing = bool(cfg.packing)
        self.batch_size = cfg.train.batch_size
        self.max_len = cfg.model.max_seq_length
        self.seed = cfg.train.seed
        if self.packing and self.max_len < 2:
            raise DataError(f"model.max_seq_length={self.max_len} leaves packed blocks no token to predict "
                            "-> raise model.max_seq_length")
        self.source = _open_source(Path(train_file), tokenizer, cfg, cfg.data.streaming)
        self.format = self.source.format
        self.samples_per_epoch = len(self.source)
        self.window = self.batch_size * WINDOW_BATCHES
        self.epoch = 0
        self.truncated = 0
        self.dropped = 0
        self.no_targets = 0
        # rows: position inside the epoch; packing: next document and the token offset inside it
        self._window_index = 0
        self._batch_in_window = 0
        self._position = 0
        self._offset = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._plan_cache: tuple[tuple[int, int], list[np.ndarray]] | None = None
        self._doc_cache: tuple[int, tuple[list[int], list[int]]] | None = None

    # -- order --------------------------------------------------------------

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = _rng(self.seed, epoch).permutation(self.samples_per_epoch)
            self._perm_cache = (epoch, perm.astype(np.int32) if self.samples_per_epoch < 2**31 else perm)
        return self._perm_cache[1]

    def _plan(self, epoch: int, window: int) -> list[np.ndarray]:
        """The batches (sample indices) of one window, in the order they are served."""
        if self._plan_cache is None or self._plan_cache[0] != (epoch, window):
            members = self._perm(epoch)[window * self.window:(window + 1) * self.window]
            members = members[np.argsort(self.source.lengths[members], kind="stable")]
            batches = [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            order = _rng(self.seed, epoch, window, 1).permutation(len(batches))
            self._plan_cache = ((epoch, window), [batches[i] for i in order])
        return self._plan_cache[1]

    def _encode(self, i: int) -> Encoded:
        row = self.source.checked_row(i)
        try:
            return encode_row(self.tok, row, self.format, self.cfg.data.mask_prompt)
        except DataError as exc:
            raise DataError(f"{where(self.source.path, self.source.lineno(i))}: {exc}") from None

    def next_members(self) -> np.ndarray:
        """The sample indices of the next batch in the order (grpo reads its prompt rows through this)."""
        while True:
            if self._window_index * self.window >= self.samples_per_epoch:
                self.epoch += 1
                self._window_index = self._batch_in_window = self._position = 0
            plan = self._plan(self.epoch, self._window_index)
            if self._batch_in_window >= len(plan):
                self._window_index += 1
                self._batch_in_window = 0
                continue
            members = plan[self._batch_in_window]
            self._batch_in_window += 1
            self._position += len(members)
            return members

    def _rows_batch(self) -> Batch:
        empty = 0
        while True:
            members = self.next_members()
            seqs = self._sequences(members)
            if seqs:
                return collate(seqs, self.tok.pad_id, self.max_len, self.paired)
            # Every row of the batch was left out; a whole epoch of that would loop forever.
            empty += 1
            if empty > self.samples_per_epoch:
                if self.no_targets:
                    raise DataError(f"{where(self.source.path)}: no row has a target token within model.max_seq_length="
                                    f"{self.max_len} (data.mask_prompt={str(self.cfg.data.mask_prompt).lower()}), "
                                    "so there is nothing to train on -> raise model.max_seq_length or set "
                                    "data.mask_prompt=false")
                raise DataError(f"{where(self.source.path)}: every row is longer than max_seq_length={self.max_len} "
                                "tokens and data.truncate=false drops them -> raise model.max_seq_length "
                                "or set data.truncate=true")

    def _sequences(self, members) -> list[tuple[list[int], list[int]]]:
        seqs = []
        for i in members:
            enc = self._encode(int(i))
            if enc.length > self.max_len and not self.cfg.data.truncate:
                self.dropped += 1
                continue
            fitted = fit(enc, self.max_len)
            if not target_tokens(fitted):
                # Nothing to learn within max_seq_length (e.g. the prompt fills it with data.mask_prompt):
                # left out, so no step is ever all padding (check_data counts and words these up front).
                self.no_targets += 1
                continue
            self.truncated += enc.length > self.max_len
            seqs.extend(fitted)
        return seqs

    # -- packing ------------------------------------------------------------

    def _doc(self, epoch: int, k: int) -> tuple[list[int], list[int]]:
        index = int(self._perm(epoch)[k])
        if self._doc_cache is None or self._doc_cache[0] != index:
            enc = self._encode(index)
            ids, mask = enc.responses[0]
            self._doc_cache = (index, (enc.prompt + ids, enc.prompt_mask + mask))
        return self._doc_cache[1]

    def _next_block(self) -> tuple[list[int], list[int]] | None:
        """The next max_seq_length block, or None when the epoch is used up (the state moves to the next)."""
        if self._position >= self.samples_per_epoch:
            self.epoch += 1
            self._position = self._offset = 0
            return None
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.max_len and self._position < self.samples_per_epoch:
            doc_ids, doc_mask = self._doc(self.epoch, self._position)
            take = self.max_len - len(ids)
            ids += doc_ids[self._offset:self._offset + take]
            mask += doc_mask[self._offset:self._offset + take]
            self._offset += take
            if self._offset >= len(doc_ids):
                self._position += 1
                self._offset = 0
        return ids, mask

    def _packed_batch(self) -> Batch:
        blocks: list[tuple[list[int], list[int]]] = []
        while len(blocks) < self.batch_size:
            block = self._next_block()
            if block is None:
                if blocks:
                    break  # the epoch's last, smaller batch
                continue
            if target_tokens([block]):  # an epoch's last scrap can be one token: nothing to predict, skipped
                blocks.append(block)
        return collate(blocks, self.tok.pad_id, self.max_len)

    # -- public -------------------------------------------------------------

    def next_batch(self) -> Batch:
        return self._packed_batch() if self.packing else self._rows_batch()

    def state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": "packed" if self.packing else "rows",
            "epoch": self.epoch,
            "position": self._position,  # samples (documents when packing) consumed in this epoch
            "window": self._window_index,
            "batch_in_window": self._batch_in_window,
            "offset": self._offset,  # packing: tokens of the current document already used
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "window_size": self.window,
            "seed": self.seed,
        }

    def restore(self, state: dict) -> None:
        changed = [f"{k} {was!r} -> {now!r}" for k, (was, now) in
                   order_changes(state, self.cfg, self.samples_per_epoch).items()]
        if changed:
            raise DataError(f"{where(self.source.path)}: the saved data position does not fit this data or config "
                            f"({'; '.join(changed)}) -> resume with the same data and batch size, or start fresh")
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._window_index = int(state["window"])
        self._batch_in_window = int(state["batch_in_window"])
        self._offset = int(state["offset"])

    def close(self) -> None:
        self.source.close()


def batches_per_epoch(report: DataReport, batch_size: int, max_seq_length: int) -> int | None:
    """The batches TrainStream serves in one epoch of the training file, from the data check's counts (what
    train.epochs is turned into steps with): ceil(rows / batch_size), a preference pair or a grpo prompt being one
    row; packed, ceil(blocks / batch_size), the rows' tokens cut into max_seq_length blocks and a last one-token
    block left out (nothing to predict). None when packed data's tokens were not counted (no tokenizer yet).
    A batch whose rows are all left out (no target token, or too long with data.truncate=false) is skipped by the
    stream, and a packed block with no target likewise, so such data ends an epoch that many batches sooner."""
    if report.packing:
        if report.train.lengths is None:
            return None
        tokens = int(report.train.lengths.sum())
        blocks = tokens // max_seq_length + (1 if tokens % max_seq_length >= 2 else 0)
    else:
        blocks = report.train.rows
    return -(-blocks // batch_size)


# ---------------------------------------------------------------------------
# Validation batches and prediction prompts

def eval_batches(val_file: Path, tokenizer: TextTokenizer, cfg: Any, max_batches: int,
                 batch_size: int) -> list[Batch]:
    """A fixed subset (drawn from cfg.train.seed) of at most ``max_batches`` batches, so every eval of a
    run, and of a resumed run, scores the same tokens. Rows are length-bucketed like training."""
    source = _open_source(Path(val_file), tokenizer, cfg, streaming=False)
    max_len = cfg.model.max_seq_length
    paired = cfg.data.method in PAIRED_METHODS
    rng = _rng(cfg.train.seed, _EVAL_STREAM)
    want = max_batches * batch_size

    def encode(i: int) -> Encoded:
        row = source.checked_row(i)
        try:
            return encode_row(tokenizer, row, source.format, cfg.data.mask_prompt)
        except DataError as exc:
            raise DataError(f"{where(val_file, source.lineno(i))}: {exc}") from None

    if cfg.packing:
        ids: list[int] = []
        mask: list[int] = []
        for i in range(len(source)):
            enc = encode(i)
            ids += enc.prompt + enc.responses[0][0]
            mask += enc.prompt_mask + enc.responses[0][1]
        blocks = [(ids[s:s + max_len], mask[s:s + max_len]) for s in range(0, len(ids), max_len)]
        blocks = [block for block in blocks if target_tokens([block])]  # as in training
        chosen = np.sort(rng.permutation(len(blocks))[:want])
        picked = [blocks[i] for i in chosen]
        return [collate(picked[s:s + batch_size], tokenizer.pad_id, max_len)
                for s in range(0, len(picked), batch_size)]

    chosen = np.sort(rng.permutation(len(source))[:want])
    chosen = chosen[np.argsort(source.lengths[chosen], kind="stable")]
    batches = []
    for s in range(0, len(chosen), batch_size):
        seqs = []
        for i in chosen[s:s + batch_size]:
            enc = encode(int(i))
            if enc.length > max_len and not cfg.data.truncate:
                continue
            fitted = fit(enc, max_len)
            if target_tokens(fitted):  # as in training: a row with nothing to score is left out
                seqs.extend(fitted)
        if seqs:
            batches.append(collate(seqs, tokenizer.pad_id, max_len, paired))
    return batches


def prediction_prompts(val_file: Path, tokenizer: TextTokenizer, cfg: Any, n: int) -> list[tuple[str, np.ndarray]]:
    """(prompt text, prompt ids) for the first ``n`` validation rows: a conversation up to its last
    assistant turn with the generation prompt, the prompt of prompt/completion and preference rows,
    or the first half of a text. Ids are cut from the left to leave room for eval.max_new_tokens."""
    if n <= 0:
        return []
    source = _open_source(Path(val_file), tokenizer, cfg, streaming=True)
    room = max(cfg.model.max_seq_length - cfg.eval.max_new_tokens, 1)
    out = []
    try:
        for i in range(min(n, len(source))):
            row = source.checked_row(i)
            if source.format == "chat" or isinstance(row.get("prompt"), list):  # conversational preference rows
                messages = row["messages"] if source.format == "chat" else row["prompt"] + [{"role": "assistant"}]
                last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
                try:
                    text = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True,
                                                          tools=row.get("tools"))
                except Exception:  # e.g. a template that refuses a conversation opening with the answer:
                    continue  # predictions are non-critical (SPEC §8), this row just gives no prompt
                ids = tokenizer.encode(text, add_special_tokens=False)
            else:
                if source.format == "text":
                    full = row["text"]
                    cut = full.rfind(" ", 0, len(full) // 2 + 1)
                    text = full[:cut if cut > 0 else max(len(full) // 2, 1)]
                else:
                    text = row["prompt"]
                ids = tokenizer.prefix_ids + tokenizer.encode(text, add_special_tokens=False)
            out.append((text, np.asarray(ids[-room:], dtype=np.int32)))
    finally:
        source.close()
    return out
