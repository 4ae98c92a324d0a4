"""The study's statistics, no I/O: plain functions over numbers and tables.

roi.py           gains and ROI, a metric's bound
significance.py  whether a gain beats the seed noise (shared by the search and the advice)
table.py         budget points, summaries, intervals
curves.py        learning curves fitted, checked and backtested
knee.py          where ROI falls, best epochs, overfitting
advice.py        the questions answered and the decision card
search.py        the adaptive budget search's decisions (its runs: app.budget_search)
"""
