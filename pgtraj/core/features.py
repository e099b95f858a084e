"""Model inputs from tokens: the one featuriser shared by training (client) and inference (in the database).
numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgtraj.core.tokenizer import BOS, N_MOVES, PAD, Tokens

MINUTE_BUCKET = 15  # minute-of-day embedding in 96 quarter-hour buckets
# the day-of-week, quarter-hour and move values of positions that are not a cell (BOS, padding) or whose
# value is hidden (absolute time from a route embedding, the move into a masked cell)
NO_DOW, NO_MINUTE, NO_MOVE = 7, 96, N_MOVES

# the columns of Inputs.cont, in order (continuous() writes them): what the torch side reads targets from
# and hides, and what the runtime hides, by name. A model reads the first ModelConfig.n_continuous of them:
# the eight of motion and time (every model), then the altitude (models trained on data with Z)
LOG_DT, LOG_DWELL, OFFSET_X, OFFSET_Y, LOG_SPEED, HEADING_SIN, HEADING_COS, INTERPOLATED, ALTITUDE = range(9)
N_CONTINUOUS = 9
WITHOUT_ALTITUDE = ALTITUDE  # how many columns a model without altitude reads
LOG_TIME_SCALE, LOG_SPEED_SCALE, LOG_ALTITUDE_SCALE = 5.0, 3.0, 10.0  # log1p(s) / 5, log1p(m/s) / 3, log1p(m) / 10
# what gives away where a position is (hidden where a token is masked)
SPATIAL = [OFFSET_X, OFFSET_Y, LOG_SPEED, HEADING_SIN, HEADING_COS, ALTITUDE]
# what carries timing (hidden from travel-time estimation)
TIMING = [LOG_DT, LOG_DWELL, LOG_SPEED]


@dataclass
class Inputs:
    """One sequence (or a padded batch, with a leading batch axis) of model inputs."""

    tokens: np.ndarray      # int64 (T,)
    dow: np.ndarray         # int64 (T,) 0-6, NO_DOW for special positions
    minute: np.ndarray      # int64 (T,) 0-95, NO_MINUTE for special positions
    cont: np.ndarray        # float32 (T, N_CONTINUOUS)
    move: np.ndarray        # int64 (T,) tokenizer move (0-7), NO_MOVE for special positions

    def window(self, start: int, stop: int) -> "Inputs":
        """Positions ``start`` to ``stop`` of one sequence (views, not copies)."""
        return Inputs(self.tokens[start:stop], self.dow[start:stop], self.minute[start:stop], self.cont[start:stop],
                      self.move[start:stop])


def continuous(x: Tokens) -> np.ndarray:
    """Per-token continuous features, scaled to roughly unit range (an unknown altitude is 0)."""
    rad = np.radians(x.heading.astype(np.float64))
    alt = np.nan_to_num(x.alt.astype(np.float64))
    return np.stack([  # in the order of the column names above
        np.log1p(np.maximum(x.dt, 0)) / LOG_TIME_SCALE,
        np.log1p(np.maximum(x.dwell, 0)) / LOG_TIME_SCALE,
        x.offset[:, 0], x.offset[:, 1],
        np.log1p(np.maximum(x.speed, 0)) / LOG_SPEED_SCALE,
        np.sin(rad), np.cos(rad),
        x.interpolated.astype(np.float64),
        np.sign(alt) * np.log1p(np.abs(alt)) / LOG_ALTITUDE_SCALE,
    ], axis=1).astype(np.float32)


def to_inputs(x: Tokens, *, add_bos: bool = True) -> Inputs:
    tokens = x.tokens.astype(np.int64)
    dow, minute = x.dow.astype(np.int64), (x.minute // MINUTE_BUCKET).astype(np.int64)
    cont = continuous(x)
    pre = [BOS] if add_bos else []
    return Inputs(
        np.concatenate([pre, tokens]).astype(np.int64),
        np.concatenate([[NO_DOW] * len(pre), dow]).astype(np.int64),
        np.concatenate([[NO_MINUTE] * len(pre), minute]).astype(np.int64),
        np.concatenate([np.zeros((len(pre), N_CONTINUOUS), np.float32), cont]),
        np.concatenate([[NO_MOVE] * len(pre), x.move]).astype(np.int64))


def collate(seqs: list[Inputs], max_len: int | None = None) -> Inputs:
    """Right-pad to the longest sequence (PAD tokens, zero features); truncate to ``max_len``."""
    n = max(len(s.tokens) for s in seqs)
    n = min(n, max_len) if max_len else n
    b = len(seqs)
    out = Inputs(np.full((b, n), PAD, np.int64), np.full((b, n), NO_DOW, np.int64),
                 np.full((b, n), NO_MINUTE, np.int64), np.zeros((b, n, N_CONTINUOUS), np.float32),
                 np.full((b, n), NO_MOVE, np.int64))
    for i, s in enumerate(seqs):
        k = min(len(s.tokens), n)
        out.tokens[i, :k], out.dow[i, :k], out.minute[i, :k], out.cont[i, :k], out.move[i, :k] = \
            s.tokens[:k], s.dow[:k], s.minute[:k], s.cont[:k], s.move[:k]
    return out
