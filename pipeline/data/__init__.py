"""Data: text sources (bundled corpus, local files, hub datasets), tokenizers, the token cache and batches.

`prepare(DataConfig)` turns a source into cached token arrays per split, once per machine; `TrainBatches`
and `eval_batches` read them. `data.source: mqar` is a synthetic recall task instead (MQARData: fresh seeded
sequences every step, fixed evaluation sets). Knows nothing of training, Ray or MLflow.
"""

from pipeline.data.loader import TrainBatches, eval_batches, num_sequences
from pipeline.data.mqar_source import MQARConfig, MQARData
from pipeline.data.prepare import DataConfig, PreparedData, bits_per_byte, cache_root, prepare
from pipeline.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "DataConfig", "HFTokenizer", "MQARConfig", "MQARData", "PreparedData", "TrainBatches",
           "bits_per_byte", "build_tokenizer", "cache_root", "eval_batches", "num_sequences", "prepare"]
