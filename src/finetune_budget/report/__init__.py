"""The study's answers from MLflow alone: ROI tables, the reference study's figures, where to stop
(ROI down to 30% of its peak, best epochs, overfitting), checked learning curves, the questions
answered and a decision card; Markdown and HTML.

    python evaluate.py mode=report tracking.experiment=<name>
    python evaluate.py mode=advise tracking.experiment=<name> advise.target_gain=0.05

build.py assembles the report from study/ (pure) and tracking.query (the runs); figures.py and
html.py draw it. The modes that run it are app.modes.report_mode and advise_mode.
"""
