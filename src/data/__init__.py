"""The user's rows, from file to batch. `formats` detects a row's format and refuses rows that do not fit the
method (naming file, line and key); `tokenizer` is the tokenizer and chat template (no framework: the `tokenizers`
library and jinja2) and how a row becomes token ids and a loss mask; `batches` is the full data check, the
resumable training order (length-bucketed, streamed or in memory), the fixed eval subset and the prediction
prompts. The names most callers need are re-exported here."""
from overnight.data.batches import TrainStream, check_data, collate, eval_batches, prediction_prompts
from overnight.data.formats import DataError, DataReport, FileReport, Problem, find_data_files
from overnight.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "DataError", "DataReport", "FileReport", "Problem", "TextTokenizer", "TrainStream",
    "check_data", "collate", "eval_batches", "find_data_files", "load_tokenizer", "prediction_prompts",
]
