"""What a trainer reuses beyond the kernels and the MiniLLM objective; ``examples/train.py`` is the loop over it.

- ``config.py``: the settings as typed dataclasses, one command-line flag per field (``flags.py``), checked before
  anything loads;
- ``methods.py``: the training methods, one class each in one table (what each trains on, its batches, its loss);
- ``run.py``: a run's state (models, optimizer, data draws, step); ``rollout.py``: the on-policy methods' samples;
- ``checkpoint.py``: atomic checkpoints, resume and its checks, the JSONL log;
- ``data.py``: prompts, teacher-forced batches, the teacher's cached answers; ``models.py``: the teacher and student;
- ``evaluation.py``: Rouge-L, validity, distinct-n, calibration, exposure bias; ``report.py``: the results' tables;
- ``tiny/``: the embedded default (tasks, tokenizer, teacher and SFT student); ``smollm2.py``: SmolLM2's loader.

The kernel package (``minillm_kernels``) does not import it.
"""
