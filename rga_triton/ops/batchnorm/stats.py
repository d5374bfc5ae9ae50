"""In-kernel statistics: a Welford/Chan merge of one tile into running (mean, M2, count), and the
BatchNorm rows that backward kernels read."""
import triton
import triton.language as tl


@triton.jit
def welford_merge(values, col_mask, mean, m2, count):
    """Fold the valid columns of ``values`` (ROWS, COLS) into per-row (mean, M2) over ``count`` values."""
    n_new = tl.sum(col_mask.to(tl.float32), axis=0)
    tile_mean = tl.sum(tl.where(col_mask[None, :], values, 0.0), axis=1) / n_new
    dev = tl.where(col_mask[None, :], values - tile_mean[:, None], 0.0)
    tile_m2 = tl.sum(dev * dev, axis=1)
    total = count + n_new
    delta = tile_mean - mean
    mean = mean + delta * (n_new / total)
    m2 = m2 + tile_m2 + delta * delta * (count * n_new / total)
    return mean, m2, total


@triton.jit
def store_partials(stats_ptr, rows, row_mask, rows_total, n_cols, col, mean, m2):
    """Write one program's (mean, M2) into column ``col`` of the partials (2, rows_total, n_cols)."""
    tl.store(stats_ptr + rows * n_cols + col, mean, mask=row_mask)
    tl.store(stats_ptr + (rows_total + rows) * n_cols + col, m2, mask=row_mask)


@triton.jit
def load_bn_rows(bn_ptr, offs, mask, rows):
    """A BatchNorm's backward description at channels ``offs``: float32 (6, rows) holding
    mean, inv_std, weight, bias, c_b, c_g (built by ``ops/batchnorm/norm.py``'s ``bn_rows``)."""
    mean = tl.load(bn_ptr + offs, mask=mask, other=0.0)
    inv_std = tl.load(bn_ptr + rows + offs, mask=mask, other=0.0)
    weight = tl.load(bn_ptr + 2 * rows + offs, mask=mask, other=0.0)
    bias = tl.load(bn_ptr + 3 * rows + offs, mask=mask, other=0.0)
    c_b = tl.load(bn_ptr + 4 * rows + offs, mask=mask, other=0.0)
    c_g = tl.load(bn_ptr + 5 * rows + offs, mask=mask, other=0.0)
    return mean, inv_std, weight, bias, c_b, c_g
