"""Data: readers (text, JSON, JSONL, CSV), packing into fixed-length examples, memmap shards, named data sets."""

from .corpus import Corpus, PackedCorpus, load_corpus, read_corpus
from .packing import PackedExamples, chunk_tokens, pack_examples
from .readers import (InvalidUTF8Warning, apply_split, expand_paths, filter_min_length, iter_examples, read_csv_pairs,
                      read_documents, read_json, read_jsonl, read_lines, read_paragraphs, read_texts, split_every_nth,
                      split_fraction)
from .registry import DATASETS, data_dir, download_dataset, resolve_dataset, verify_dataset
from .shards import ShardDataset, choose_dtype, prepare_shards

__all__ = [
    "read_corpus", "load_corpus", "Corpus", "PackedCorpus",
    "expand_paths", "read_lines", "read_paragraphs", "read_documents", "read_json", "read_jsonl", "read_csv_pairs",
    "read_texts", "iter_examples", "split_fraction", "split_every_nth", "apply_split",
    "filter_min_length", "InvalidUTF8Warning",
    "PackedExamples", "pack_examples", "chunk_tokens",
    "prepare_shards", "ShardDataset", "choose_dtype",
    "DATASETS", "data_dir", "resolve_dataset", "download_dataset", "verify_dataset",
]
