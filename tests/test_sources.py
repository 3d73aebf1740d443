"""Data that is not JSONL (src/data/sources.py): parquet files and the hub's shards, datasets' save_to_disk folders,
hub datasets (a local dataset folder through datasets.load_dataset, no network) and data.columns. Each source must
give the same rows, batches and losses as the same rows written as JSONL, the same refusals naming the user's source
and row, and the same resume checks."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import has

from overnight.config import Config, ConfigError
from overnight.data import DataError, TrainStream, check_data, find_data_files, load_tokenizer
from overnight.commands.validate_data import validate_data_main
from overnight.runs.rundir import read_metrics

from test_cli import REF, overnight

pytestmark = pytest.mark.skipif(not has("datasets", "pyarrow"), reason="needs the data extra (datasets, pyarrow)")

ADDED = datetime.datetime(2024, 5, 1, 12, 30)


def chat_row(i: int) -> dict:
    """A conversation as the JSONL format wants it; the arrow copy also carries values JSON has no type for."""
    messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}, since {i} and {i} make {2 * i}." + " Yes." * (i % 5)}]
    if i % 3 == 0:  # a field only some messages have: arrow gives every message one, null where it was missing
        messages[1]["name"] = "calc"
    return {"messages": messages, "id": i, "added": ADDED.isoformat()}


def arrow_rows(rows: list[dict]) -> list[dict]:
    return [dict(row, id=np.int64(row["id"]), added=ADDED) for row in rows]


TRAIN = [chat_row(i) for i in range(40)]
VAL = [chat_row(100 + i) for i in range(8)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(arrow_rows(rows)), path)


def save_to_disk(path: Path, splits: dict[str, list[dict]] | list[dict]) -> None:
    import datasets

    def dataset(rows):
        return datasets.Dataset.from_list(arrow_rows(rows))

    saved = dataset(splits) if isinstance(splits, list) else \
        datasets.DatasetDict({name: dataset(rows) for name, rows in splits.items()})
    saved.save_to_disk(str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Each source kind holding TRAIN (and VAL), next to the JSONL they must equal."""
    root = tmp_path_factory.mktemp("sources")
    write_jsonl(root / "jsonl" / "train.jsonl", TRAIN)
    write_jsonl(root / "jsonl" / "val.jsonl", VAL)
    write_parquet(root / "parquet" / "train.parquet", TRAIN)
    write_parquet(root / "parquet" / "validation.parquet", VAL)
    write_parquet(root / "shards" / "data" / "train-00000-of-00002.parquet", TRAIN[:25])
    write_parquet(root / "shards" / "data" / "train-00001-of-00002.parquet", TRAIN[25:])
    write_parquet(root / "shards" / "data" / "test-00000-of-00001.parquet", VAL)
    save_to_disk(root / "saved_dict", {"train": TRAIN, "test": VAL[:2], "validation": VAL})
    save_to_disk(root / "saved_one", TRAIN)
    renamed = [{"turns": r["messages"], "id": r["id"], "added": r["added"]} for r in TRAIN]
    write_jsonl(root / "renamed" / "train.jsonl", renamed)
    write_jsonl(root / "renamed" / "val.jsonl", [{"turns": r["messages"], "id": r["id"], "added": r["added"]}
                                                 for r in VAL])
    return {"root": root, **{p.name: p for p in root.iterdir()}}


@pytest.fixture(autouse=True)
def own_caches(tmp_path_factory, monkeypatch):
    """The converted copies and datasets' own cache in temp folders, for the CLI runs too (they inherit os.environ)."""
    caches = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("OVERNIGHT_CACHE", str(caches / "overnight"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(caches / "hf-datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", caches / "hf-datasets")


def cfg_for(columns=None, hub=None) -> Config:
    cfg = Config()
    cfg.train.batch_size = 4
    cfg.model.max_seq_length = 64
    cfg.data.columns = dict(columns or {})
    cfg.data.hf_dataset.name = hub
    return cfg


def batches(path: Path, tok, cfg: Config, n: int = 6) -> list[np.ndarray]:
    stream = TrainStream(path, tok, cfg)
    try:
        return [stream.next_batch().input_ids for _ in range(n)]
    finally:
        stream.close()


def test_every_source_gives_the_jsonl_rows_and_batches(sources, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    reference = (sources["jsonl"] / "train.jsonl").read_bytes(), (sources["jsonl"] / "val.jsonl").read_bytes()
    expected = batches(sources["jsonl"] / "train.jsonl", tok, cfg_for())
    cases = {
        "parquet": (sources["parquet"], cfg_for()),
        "hub shards": (sources["shards"], cfg_for()),
        "save_to_disk DatasetDict": (sources["saved_dict"], cfg_for()),
        "save_to_disk Dataset": (sources["saved_one"], cfg_for()),
        "hub dataset": (Path("unused"), cfg_for(hub=str(sources["shards"]))),
        "jsonl + data.columns": (sources["renamed"], cfg_for({"messages": "turns"})),
    }
    for name, (path, cfg) in cases.items():
        train, val = find_data_files(path, cfg.data.columns, cfg.data.hf_dataset)
        # Nulls arrow filled in (a message's missing "name") are dropped; numpy ints and timestamps become JSON.
        assert train.read_bytes() == reference[0], name
        if name != "save_to_disk Dataset":  # one Dataset is training rows only
            assert val.read_bytes() == reference[1], name
        else:
            assert val is None
        got = batches(train, tok, cfg)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), name
        # a second start reads the same copy: nothing converted again
        assert find_data_files(path, cfg.data.columns, cfg.data.hf_dataset)[0] == train


def test_validate_data_takes_every_source(sources, capsys):
    for path, sets, named in [
        (sources["parquet"], [], f"{sources['parquet'] / 'train.parquet'}: 40 valid row(s), chat format"),
        (sources["shards"], [], f"{sources['shards'] / 'data' / 'train-*.parquet'}: 40 valid row(s)"),
        (sources["saved_dict"], [], f"{sources['saved_dict']} split 'validation': 8 valid row(s)"),
        (sources["saved_one"], [], f"{sources['saved_one']}: 40 valid row(s)"),
        (sources["renamed"], ["data.columns={messages: turns}"], f"{sources['renamed'] / 'train.jsonl'}: 40 valid"),
        (None, [f"data.hf_dataset.name={sources['shards']}"], "split 'test': 8 valid row(s)"),
    ]:
        lines: list[str] = []
        code = validate_data_main(str(path) if path else None, None, None, out=lines.append, sets=sets)
        text = "\n".join(lines)
        assert code == 0 and named in text and "no problems" in text, text
    lines = []
    assert validate_data_main(None, None, None, out=lines.append) == 2 and "data.hf_dataset.name" in lines[0]


def test_a_bad_row_is_named_by_source_split_row_and_key(sources, tmp_path):
    bad = [dict(r) for r in TRAIN]
    bad[2] = dict(bad[2], messages=[{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}])
    write_parquet(tmp_path / "pq" / "train.parquet", bad)
    save_to_disk(tmp_path / "saved", {"train": bad})
    for path, where in [(tmp_path / "pq", f"{tmp_path / 'pq' / 'train.parquet'} row 3 (index 2)"),
                        (tmp_path / "saved", f"{tmp_path / 'saved'} split 'train' row 3 (index 2)")]:
        lines: list[str] = []
        assert validate_data_main(str(path), "sft", None, out=lines.append) == 2
        assert any(line.startswith(f"  {where}: key 'messages[1].role': is 'bot'") for line in lines), lines
        with pytest.raises(DataError, match=r"row 3 \(index 2\): key 'messages\[1\]\.role': is 'bot'"):
            check_data(path, "sft").raise_if_problems()
    # A split saved with no rows: datasets cannot load the folder again; the split is named, not a traceback's text
    save_to_disk(tmp_path / "empty_split", {"train": TRAIN, "test": []})
    lines = []
    assert validate_data_main(str(tmp_path / "empty_split"), "sft", None, out=lines.append) == 2
    assert lines[0].startswith(f"error: {tmp_path / 'empty_split'} split 'test': has no rows") and \
        "del ds['test']" in lines[0], lines
    # A shard names its own file and row: the split's row 27 is row 2 of the second shard.
    write_parquet(tmp_path / "sh" / "data" / "train-00000-of-00002.parquet", TRAIN[:25])
    write_parquet(tmp_path / "sh" / "data" / "train-00001-of-00002.parquet", [TRAIN[25], bad[2]])
    report = check_data(tmp_path / "sh", "sft")
    assert [str(p).split(":")[0] for p in report.problems] == [
        f"{tmp_path / 'sh' / 'data' / 'train-00001-of-00002.parquet'} row 2 (index 1)"]
    # A missing shard is refused, not trained on as half a split.
    (tmp_path / "sh" / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"the shards do not make a whole split.*missing 00001"):
        find_data_files(tmp_path / "sh")


def test_values_json_cannot_hold_are_refused_by_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"text": "a", "image": b"\x89PNG\xff", "score": 1.0},
                                  {"text": "b", "image": b"plain", "score": float("nan")}])
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(DataError) as err:
        find_data_files(tmp_path)
    text = str(err.value)
    assert "2 value(s) in the data have no JSON form" in text
    assert f"{tmp_path / 'train.parquet'} row 1 (index 0): column 'image' holds binary data" in text
    assert f"{tmp_path / 'train.parquet'} row 2 (index 1): column 'score' holds nan" in text
    assert "Traceback" not in text


def test_values_are_what_the_data_says(tmp_path):
    """A float32 is its shortest decimal (an exact_match reward compares its text), a map is an object, a null item
    of a list stays; a column Python cannot hold and a damaged file are refused by name, exit 2, no traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "prompt": ["2+2?", "1/10?"], "completion": ["4", "0.1"],
        "answer": pa.array([4.0, 0.1], pa.float32()), "half": pa.array([0.5, 0.1], pa.float16()),
        "nested": pa.array([[{"x": 0.1}], []], pa.list_(pa.struct([("x", pa.float32())]))),
        "meta": pa.array([[("k", 1)], []], pa.map_(pa.string(), pa.int64())),
        "items": pa.array([[1, None], None], pa.list_(pa.int64())),
        "label": pa.array([0.1, 0.1], pa.float32()).dictionary_encode()}), tmp_path / "train.parquet")
    train, _ = find_data_files(tmp_path)
    assert [json.loads(line) for line in train.read_text().splitlines()] == [
        {"prompt": "2+2?", "completion": "4", "answer": 4.0, "half": 0.5, "nested": [{"x": 0.1}], "meta": {"k": 1},
         "items": [1, None], "label": 0.1},
        {"prompt": "1/10?", "completion": "0.1", "answer": 0.1, "half": 0.1, "nested": [], "meta": {},
         "label": 0.1}]

    far = tmp_path / "far"  # a date past the year 9999
    far.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "when": pa.array([0, 253402300800 + 86400], pa.timestamp("s"))}),
                   far / "train.parquet")
    lines: list[str] = []
    assert validate_data_main(str(far), None, None, out=lines.append) == 2
    assert f"{far / 'train.parquet'} row 1 (index 0) to {far / 'train.parquet'} row 2 (index 1): column 'when' " \
           "cannot be read into Python" in lines[0], lines

    # a corrupt page: the file is named as damaged, not the cache as unwritable
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    pq.write_table(pa.table({"text": [f"row {i} " * 40 for i in range(2000)]}), damaged / "train.parquet")
    raw = bytearray((damaged / "train.parquet").read_bytes())
    raw[1000:3000] = bytes(b ^ 0x5A for b in raw[1000:3000])
    (damaged / "train.parquet").write_bytes(bytes(raw))
    done = overnight("validate-data", str(damaged))
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    assert f"{damaged / 'train.parquet'}: cannot be read as parquet (" in said, said
    assert "Traceback" not in said and "free some space" not in said


def test_a_damaged_copy_in_the_cache_is_written_again(sources, monkeypatch):
    """A copy truncated or edited in the cache between runs is not trained on (nor blamed on the user's file by a
    resume): it no longer matches the sha256 recorded with it, and is written again from the source."""
    from overnight.data import sources as src

    reference = (sources["jsonl"] / "train.jsonl").read_bytes()
    train, _ = find_data_files(sources["parquet"])
    assert train.read_bytes() == reference
    for damage in (lambda p: p.write_bytes(reference[:len(reference) // 2]),  # truncated
                   lambda p: p.write_bytes(reference.replace(b"plus", b"PLUS", 1)),  # edited, same size
                   lambda p: Path(str(p) + ".sha256").unlink()):  # the record gone: nothing to check against
        damage(train)
        monkeypatch.setattr(src, "_LOCAL_MEMO", {})  # a new process
        assert find_data_files(sources["parquet"])[0] == train
        assert train.read_bytes() == reference


def test_a_copy_another_process_wrote_meanwhile_is_kept(tmp_path):
    """Two processes converting the same split at once (a data-parallel job's ranks): the one that finishes second
    keeps the first one's copy, which the first may be reading already (its file-stamp guard would stop the run
    were the file replaced), and never leaves a partial file."""
    from overnight.data import sources as src
    from overnight.data.formats import SourceLabel, stamp_of

    label = SourceLabel(str(tmp_path / "train.parquet"))
    rows = b"".join(json.dumps(r).encode() + b"\n" for r in TRAIN)
    first: dict = {}

    def slow_write(f):  # this process converts; meanwhile another one converts the same split and reads its copy
        f.write(rows[:100])
        first["out"] = src._copy(label, "same source", {}, lambda g: g.write(rows))
        first["stamp"] = stamp_of(first["out"])
        f.write(rows[100:])

    out = src._copy(label, "same source", {}, slow_write)
    assert out == first["out"] and out.read_bytes() == rows
    assert stamp_of(out) == first["stamp"]  # the same file: not replaced under the first process
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name,
                                                                                           out.name + ".sha256"]


def test_column_mapping_refusals(sources, tmp_path):
    with pytest.raises(DataError, match=r"maps 'messages' to the column 'turn', which the data does not have "
                                        r"\(its columns: messages, id, added\)"):
        find_data_files(sources["parquet"], {"messages": "turn"})
    with pytest.raises(DataError, match=r"renamed/train.jsonl: data.columns maps 'text' to the column 'body', "
                                        r"which the data does not have \(its columns: turns, id, added\)"):
        find_data_files(sources["renamed"], {"text": "body"})
    # a row whose mapped column is missing is named by the user's column, not the row key it maps to
    write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "a": "b"}, {"question": "c", "a": "d"}])
    report = check_data(tmp_path, "sft", cfg=cfg_for({"prompt": "q", "completion": "a"}))
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'train.jsonl'}:2: key 'q' (data.columns maps it to 'prompt'): missing -> completion rows "
        """need 'prompt', 'completion', e.g. {"prompt": "Q: 2+2?\\nA:", "completion": " 4"}"""]
    with pytest.raises(ConfigError, match=r"'question' is not a key of any row format.*did you mean \{prompt: "):
        validate_data_main(str(tmp_path), None, None, out=print, sets=["data.columns={question: prompt}"])


def test_a_folder_of_no_known_layout_lists_what_is_accepted(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"missing train.jsonl \(found: rows.csv\).*train.parquet.*save_to_disk"):
        find_data_files(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", TRAIN[:2])
    write_parquet(tmp_path / "train.parquet", TRAIN[:2])
    with pytest.raises(DataError, match="more than one layout"):
        find_data_files(tmp_path)


def test_an_offline_hub_dataset_not_in_the_cache_is_exit_2_naming_it():
    lines: list[str] = []
    code = validate_data_main(None, None, None, out=lines.append, sets=["data.hf_dataset.name=nobody/no-such-set"])
    assert code == 2
    assert "hub dataset nobody/no-such-set: offline (HF_HUB_OFFLINE) and not in the Hugging Face cache" in lines[0]
    assert "run once online" in lines[0] and "save_to_disk('DIR') and pass --data DIR" in lines[0]


def test_a_hub_dataset_folder_or_config_that_is_not_there_is_named_so(sources, tmp_path):
    """Not 'offline and not in the Hugging Face cache' for what being online would not fix."""
    for sets, said in [
        ([f"data.hf_dataset.name={sources['shards']}", "data.hf_dataset.config=zz"],
         f"hub dataset {sources['shards']} (config zz): has no config 'zz' ("),
        ([f"data.hf_dataset.name={tmp_path / 'nope'}"], f"hub dataset {tmp_path / 'nope'}: no such folder (")]:
        lines: list[str] = []
        assert validate_data_main(None, None, None, out=lines.append, sets=sets) == 2
        assert lines[0].startswith("error: " + said) and "offline" not in lines[0], lines


# ---------------------------------------------------------------------------
# Training and resuming (the CLI, the numpy reference backend: losses bit for bit)

def train_args(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--backend", REF, "--model", str(model), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--quiet", "--set", "train.report_every=1",
            "--set", "eval.every_steps=5", "--set", "checkpoint.every_steps=5", "--set", "eval.max_batches=2",
            "--set", "train.warmup_steps=2", "--set", "lora.rank=4", "--set", "model.max_seq_length=64",
            # the learning rate then does not depend on max_steps: stopped at 5 and resumed to 10 is the 10-step run
            "--set", "train.schedule=constant", *extra]


def losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["event"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run)
            if r.get("event") in ("train", "eval")]


@pytest.mark.slow
def test_parquet_and_hub_train_as_jsonl_and_resume_exactly(sources, tiny_model_dir, tmp_path):
    reference = overnight(*train_args(tiny_model_dir, sources["jsonl"], tmp_path / "jsonl", 10))
    assert reference.returncode == 0, reference.stderr
    expected = losses(tmp_path / "jsonl")
    hub = overnight(*train_args(tiny_model_dir, Path("unused"), tmp_path / "hub", 10,
                                "--set", f"data.hf_dataset.name={sources['shards']}"))
    assert hub.returncode == 0, hub.stderr
    assert losses(tmp_path / "hub") == expected
    # parquet, stopped at step 5 and resumed: the same losses as the uninterrupted JSONL run
    data = tmp_path / "data"
    write_parquet(data / "train.parquet", TRAIN)
    write_parquet(data / "val.parquet", VAL)
    first = overnight(*train_args(tiny_model_dir, data, tmp_path / "pq", 5))
    assert first.returncode == 0, first.stderr
    # the converted copy truncated in the cache meanwhile: written again from the parquet file, not refused as
    # changed data (nor trained on as fewer rows)
    copy = find_data_files(data)[0]
    copy.write_bytes(copy.read_bytes()[:1000])
    resumed = overnight(*train_args(tiny_model_dir, data, tmp_path / "pq", 10, "--auto-resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert [x for x in losses(tmp_path / "pq") if x[1] > 0] == [x for x in expected if x[1] > 0]
    # a changed parquet file under the run: the resume is refused, naming the file as the user knows it
    write_parquet(data / "train.parquet", TRAIN[:-1] + [chat_row(999)])
    refused = overnight(*train_args(tiny_model_dir, data, tmp_path / "pq", 12, "--auto-resume"))
    assert refused.returncode == 3, refused.stderr
    assert f"train data file contents ({data / 'train.parquet'} differs" in refused.stderr


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs torch, transformers, peft")
def test_torch_trains_on_a_saved_dataset_as_on_jsonl(sources, tiny_model_dir, tmp_path):
    runs = {}
    for name in ("jsonl", "saved_dict"):
        args = train_args(tiny_model_dir, sources[name], tmp_path / name, 3, "--set", "model.quantization.bits=0")
        args[args.index(REF)] = "torch"
        done = overnight(*args, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[name] = losses(tmp_path / name)
    assert runs["saved_dict"] == runs["jsonl"] and len(runs["jsonl"]) >= 3


# overnight as it was before this checkout's converter (version 1: a float32 written as the double arrow hands over,
# a map as [key, value] pairs) and before checkpoints recorded the converter: `overnight train` under that code.
_CONVERTER_V1_TRAIN = """
import sys
from overnight.data import sources
from overnight.runs import fingerprint
from overnight.commands.cli import main

sources.CONVERSION_VERSION = 1
sources._typed = lambda typ: False
compute = fingerprint.compute


def without_converter_record(*args, **kwargs):
    found = compute(*args, **kwargs)
    found.pop("train_conversion", None)
    found.pop("val_conversion", None)
    return found


fingerprint.compute = without_converter_record
sys.exit(main(sys.argv[1:]))
"""


def test_a_resume_after_overnight_converts_the_same_parquet_differently_says_so_and_what_to_do(tiny_model_dir,
                                                                                                tmp_path):
    """A run started under converter version 1 on a parquet file with float32 values, resumed after the converter
    changed: the copy's sha256 differs though the user's file does not. The refusal (exit 3) says that overnight's
    converter changed and the file is unchanged, names the file, and offers --allow-config-change (which resumes)
    or --fresh, not "undo the change". Without the old copy in the cache to prove it, the data change is refused as
    before, saying the converter may be the difference."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import ROOT
    from test_cli import env

    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train", TRAIN), ("validation", VAL)):
        table = pa.Table.from_pylist([{"messages": r["messages"]} for r in rows])
        table = table.append_column("score", pa.array([0.1 * (i + 1) for i in range(len(rows))], pa.float32()))
        pq.write_table(table, data / f"{name}.parquet")
    run = tmp_path / "run"
    old = subprocess.run([sys.executable, "-c", _CONVERTER_V1_TRAIN, *train_args(tiny_model_dir, data, run, 5)],
                         capture_output=True, text=True, env=env(), stdin=subprocess.DEVNULL, timeout=120, cwd=ROOT)
    assert old.returncode == 0, old.stderr
    refused = overnight(*train_args(tiny_model_dir, data, run, 10, "--auto-resume"))
    assert refused.returncode == 3, refused.stderr
    said = refused.stderr
    for split, name, versions in (("train", "train.parquet", "version 1 -> 2: float32 and float16 values written "
                                   "as their shortest decimal"), ("validation", "validation.parquet", "version 1 -> 2)")):
        assert (f"{split} data as overnight converts it: {data / name} is unchanged, but overnight's converter changed "
                f"since the checkpoint ({versions}" in said), said  # what the converter changed: said once
    assert "differs from the data the checkpoint was trained on" not in said and "Undo the change" not in said
    assert "Your data needs no change: pass --allow-config-change" in said and "--fresh" in said
    assert "Traceback" not in said
    # the old copies gone from the cache (removing it is safe): no proof, so a data change, the converter named
    current = [find_data_files(data)[0].name, find_data_files(data)[1].name]
    for copy in (Path(os.environ["OVERNIGHT_CACHE"]) / "data").glob("*.jsonl"):
        if copy.name not in current and copy.name.rsplit("-", 1)[0] in {c.rsplit("-", 1)[0] for c in current}:
            copy.unlink()
    unproven = overnight(*train_args(tiny_model_dir, data, run, 10, "--auto-resume"))
    assert unproven.returncode == 3, unproven.stderr
    assert (f"train data file contents ({data / 'train.parquet'} differs from the data the checkpoint was trained on; "
            "if you did not change it, the difference is overnight's converter, which changed since the checkpoint "
            "(version 1 -> 2: " in unproven.stderr), unproven.stderr
    allowed = overnight(*train_args(tiny_model_dir, data, run, 10, "--auto-resume", "--allow-config-change"))
    assert allowed.returncode == 0, allowed.stderr
    resume = next(r for r in read_metrics(run) if r["event"] == "resume")
    assert resume["from_step"] == 5 and len(resume["overridden"]) == 2


def test_an_empty_parquet_split_says_what_to_do_in_parquet_terms(tmp_path):
    """A parquet file with no rows: the message names it and asks for rows (or leaving it out), not for JSON lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_parquet(tmp_path / "train.parquet", TRAIN[:4])
    pq.write_table(pa.table({"messages": pa.array([], type=pa.table(
        {"messages": [arrow_rows(TRAIN[:1])[0]["messages"]]}).schema.field("messages").type)}),
        tmp_path / "validation.parquet")
    lines: list[str] = []
    assert validate_data_main(str(tmp_path), None, None, out=lines.append) == 2
    text = "\n".join(lines)
    assert "validation.parquet" in text and "is empty (no rows)" in text, text
    assert "add rows to it, or leave it out of the data" in text and "JSON object per line" not in text, text
