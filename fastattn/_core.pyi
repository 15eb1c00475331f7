import numpy as np

def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    mask: np.ndarray | None,
    scale: float,
    causal: bool,
    num_threads: int,
) -> None: ...
