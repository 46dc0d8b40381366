"""What ``examples/train.py`` needs beyond the kernels and the MiniLLM objective: data (``data.py``: prompts,
teacher-forced batches, the teacher's cached answers), evaluation (``evaluation.py``: Rouge-L, validity, distinct-n,
calibration, exposure bias), the embedded ``tiny`` default (``tiny/``: tasks, tokenizer, teacher and SFT student)
and the ``smollm2`` loader (``smollm2.py``). The kernel package (``minillm_kernels``) does not import it."""
