import numpy as np

def fill_step(page_indptr: np.ndarray, page_indices: np.ndarray, last_page_len: np.ndarray,
              slot_mapping: np.ndarray, page_size: int, out: dict[str, np.ndarray],
              high: np.ndarray) -> int: ...
