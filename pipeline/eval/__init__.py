"""Evaluation of a trained model: perplexity and bits per byte on a split, the paper's tail metric,
MQAR recall, and lm-evaluation-harness tasks through an adapter."""

from pipeline.eval.evaluate import evaluate_checkpoint, evaluate_model, evaluate_split, paper_metric
from pipeline.eval.mqar import make_mqar, mqar_accuracy

__all__ = ["evaluate_checkpoint", "evaluate_model", "evaluate_split", "make_mqar", "mqar_accuracy",
           "paper_metric"]
