"""`arithmetic_local`: few-shot two-operand integer arithmetic, generated deterministically (no data files).

A probe of in-context reasoning (the paper's claim that latent thoughts help few-shot learning): the model sees
`num_fewshot` solved problems, then must generate the answer, scored by exact match on the first integer it
produces. Items are drawn by a fixed-seed `random.Random`, so every run, machine and Python version gets the same
problems. `--metadata '{"arithmetic_digits": 2, "arithmetic_num_test": 200}'` changes the size of the operands and
of the test split.

    Question: What is 37 plus 48?
    Answer: 85
"""

import random

import datasets


OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
SPLIT_SEEDS = {"train": 1729, "test": 2718}  # different streams, so few-shot examples are not test items


def arithmetic_problems(num_items: int, digits: int, seed: int) -> list[dict[str, str]]:
    """`num_items` problems `{"question", "answer"}` with operands of 1..`digits` digits, from `random.Random(seed)`."""
    rng = random.Random(seed)
    high = 10**digits - 1
    problems = []
    for _ in range(num_items):
        a, b = rng.randint(0, high), rng.randint(0, high)
        name = rng.choice(sorted(OPERATIONS))
        problems.append({"question": f"What is {a} {name} {b}?", "answer": str(OPERATIONS[name](a, b))})
    return problems


def load_problems(
    arithmetic_digits: int = 2, arithmetic_num_test: int = 200, arithmetic_num_train: int = 50, **metadata
) -> datasets.DatasetDict:
    """`custom_dataset` of the task: train (few-shot pool) and test splits. lm-eval passes the task's metadata (and
    model_args from the CLI) as keyword arguments; only the `arithmetic_*` ones are read."""
    sizes = {"train": int(arithmetic_num_train), "test": int(arithmetic_num_test)}
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(arithmetic_problems(size, int(arithmetic_digits), SPLIT_SEEDS[split]))
            for split, size in sizes.items()
        }
    )
