"""Study report: scaling-law fits, Pareto fronts and one self-contained HTML file, read from MLflow."""
from pipeline.report.build import ReportResult, make_report

__all__ = ["ReportResult", "make_report"]
