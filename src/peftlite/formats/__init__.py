"""Adapter files: peftlite's own format, PEFT's directories and LyCORIS files, around one in-memory form.

    schema.py           the config schema and its validation; AdapterFileError
    _safetensors.py     the one safetensors reader and atomic writer
    native.py           save / load (a peftlite file, or a PEFT directory through peft.py)
    peft.py             PEFT LoRA directories, read and written (never imports native)
    lycoris.py          LyCORIS / kohya single files (LoRA / LoCon, LoHa, LoKr), read and written;
                        _lycoris_names.py maps their underscored module names to the model's,
                        _lycoris_factors.py each algorithm's factors to peftlite's and back
"""
