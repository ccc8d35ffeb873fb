"""The tooling around the LTM model package: never shipped to the Hub.

`modeling_ltm/` (the package above) holds exactly the files `ltm export` and `save_pretrained` copy next to the weights
as remote code for `trust_remote_code=True`. Everything that trains, evaluates, converts or exports a model lives here
instead and is never copied: the trainer (`trainer.py`, `LTMTrainer`), the amortized posterior encoder's training
(`amortized.py`), the data pipeline (`data.py`), the run folder (`run_folder.py`), budgets (`budgets.py`), the CLI error
handling (`cli_errors.py`) and the `ltm` command line (`cli.py` and its subcommands: `train_cli.py`, `generate_cli.py`,
`compare_cli.py`, `convert_original.py`). Tooling imports the model package (`from ..inference import ...`); the
model package never imports the tooling (tests/test_structure.py checks both).
"""
