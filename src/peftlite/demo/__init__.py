"""The demo (``peftlite demo``, ``python -m peftlite.demo``) and its data.

    run.py      the demo: pretrain on digits 0-4, adapt to 5-9 four ways, ship and merge the adapter
    options.py  its command-line options (shared with ``peftlite demo``)
    digits.py   scikit-learn's bundled digits as a transfer task, a tiny ResNet, a training loop;
                public, for the examples
"""
