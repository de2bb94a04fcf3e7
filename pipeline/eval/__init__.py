"""Evaluation of a trained model: perplexity and bits per byte on a split, the paper's tail metric,
MQAR recall, evaluation variants, a saved checkpoint scored, and lm-evaluation-harness tasks through an adapter."""

from pipeline.eval.checkpoint import evaluate_checkpoint
from pipeline.eval.evaluate import evaluate_model, evaluate_split, paper_metric
from pipeline.eval.mqar import make_mqar, mqar_accuracy

__all__ = ["evaluate_checkpoint", "evaluate_model", "evaluate_split", "make_mqar", "mqar_accuracy",
           "paper_metric"]
