"""One function per book figure: a results Dataset (+ selection, reduction) in, a Figure out.

Modules follow the chapters: ``example_images`` (ch. 2), ``architecture`` (ch. 3),
``generalization`` (measures of ch. 4 and the OOD figures of ch. 8), ``hyperparameters``
(ch. 6), ``imaging_conditions`` (ch. 7 and the dose heatmaps of ch. 9), ``structure``
(the structure figures of ch. 9), ``companion`` (ch. 10, generalization without transfer).
Shared helpers live in ``_common``.
"""


def plural(n: int, noun: str) -> str:
    """``"1 finished run"``, ``"3 finished runs"``: counts in the book's generated prose."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
