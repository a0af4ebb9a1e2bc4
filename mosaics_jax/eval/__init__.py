"""Evaluation: tasks that score a trained model (`mosaics-eval`), on top of inference.

    mosaics-eval runs/mm2-char --task perplexity --task niah_single --set niah_single.lengths=[512]

Each task generates its examples locally (RULER's synthetic tasks, RegBench's languages) or reads
the files a user gives (RULER's QA dev sets), and scores them as the task's source does. Evaluation
reads checkpoints and never trains.
"""
