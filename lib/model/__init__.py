"""The fusion head: network and inference, dataset, training, tuning, evaluation, registry."""
