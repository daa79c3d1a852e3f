"""Writes examples/customers.csv: a small, made-up churn table (seeded, so the file is the same every time)."""

from pathlib import Path

import numpy as np
import pandas as pd

ROWS = 300


def customers(rows: int = ROWS, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "pro", "enterprise"], size=rows, p=[0.5, 0.35, 0.15])
    base = {"basic": 30.0, "pro": 80.0, "enterprise": 250.0}
    seats = np.array([rng.integers(1, 4) if p == "basic" else rng.integers(2, 21) if p == "pro" else rng.integers(20, 201)
                      for p in plan])  # fmt: skip
    spend = np.array([base[p] for p in plan]) + rng.normal(0, 1, rows).round(2) * 20 + rng.integers(0, 60, rows)
    spend = spend.round(2)
    # Churn is likelier for customers who pay a lot for few seats, and on the basic plan.
    risk = 1.6 * (spend / seats > 30) + 0.8 * (plan == "basic") - 1.0 * (plan == "enterprise") - 1.2
    churned = np.where(rng.random(rows) < 1 / (1 + np.exp(-2.5 * risk)), "yes", "no")
    frame = pd.DataFrame({"plan": plan, "monthly_spend": spend, "seats": seats, "churned": churned})
    frame.loc[rng.random(rows) < 0.06, "monthly_spend"] = np.nan  # some customers have no spend on record yet
    return frame


if __name__ == "__main__":
    path = Path(__file__).with_name("customers.csv")
    customers().to_csv(path, index=False)
    print(f"wrote {path}")
