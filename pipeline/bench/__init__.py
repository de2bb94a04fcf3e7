"""Benchmarks: commands that time Attamba against its baseline in the same run and print the ratios
(`attamba bench attention|train-step|decode|matvec`). Never run as tests."""
