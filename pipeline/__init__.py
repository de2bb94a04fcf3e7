"""The pipeline around the model: data, train, eval, tracking, ray, study, search, report, bench."""
