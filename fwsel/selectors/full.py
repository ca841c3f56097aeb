"""`full`: every candidate, uniform weights (a reference row, not budget-matched)."""

from fwsel.selectors.base import Pool, Selection, Selector, uniform


class FullSelector(Selector):
    name = "full"

    def select(self, pool: Pool) -> Selection:
        return uniform(range(len(pool.rows)))
