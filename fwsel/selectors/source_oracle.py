"""`source_oracle`: reads the `source` tags (a ceiling that shows what selection could buy)."""

from fwsel.selectors.base import Pool, Selection, Selector, uniform


class SourceOracle(Selector):
    name = "source_oracle"

    def __init__(self, priority=("target",), **kw) -> None:
        super().__init__(priority=priority, **kw)
        self.rank = {s: i for i, s in enumerate(priority)}

    def select(self, pool: Pool) -> Selection:
        order = sorted(range(len(pool.rows)),
                       key=lambda i: (self.rank.get(pool.rows[i]["source"], len(self.rank)), i))
        return uniform(order[: pool.k])
