"""The one training loop behind train_pretrain.py and train_sft.py, one module per job."""
