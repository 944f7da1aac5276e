"""Our video model under lmms-eval: the model wrapper (lmms_model.py) and local tasks (local_tasks.py, tasks/)."""
