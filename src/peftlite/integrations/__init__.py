"""Glue to other libraries' training tools; each module imports its library, the package root imports none.

    transformers.py  ``AdapterTrainer``: a Hugging Face ``Trainer`` whose checkpoints hold the adapter file
    tensorboard.py   a TensorBoard ``SummaryWriter``, or an error that names the extra to install
"""
