"""The fair-share rule of admission (`buffer.table.share_slots`): free slots go one at a time to the
client with the fewest groups accepted plus prompts in flight, ties to the client that asked first."""

from buffer.table import share_slots


def test_slots_go_to_fewest_in_flight_first():
    got = share_slots(4, {"a": 8, "b": 8}, {"a": 6, "b": 0})
    assert got == {"a": 0, "b": 4}


def test_equal_clients_split_evenly():
    got = share_slots(8, {"a": 16, "b": 16, "c": 16, "d": 16}, {})
    assert got == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_converges_to_equal_in_flight():
    in_flight = {"a": 5, "b": 2, "c": 0}
    got = share_slots(6, {"a": 10, "b": 10, "c": 10}, in_flight)
    after = {c: in_flight[c] + got[c] for c in got}
    assert sum(got.values()) == 6
    assert max(after.values()) - min(after.values()) <= 1


def test_never_more_than_wanted_or_free():
    got = share_slots(10, {"a": 1, "b": 2}, {})
    assert got == {"a": 1, "b": 2}
    assert share_slots(0, {"a": 3}, {}) == {"a": 0}
    assert share_slots(-2, {"a": 3}, {}) == {"a": 0}


def test_ties_go_to_who_asked_first():
    assert share_slots(1, {"late": 1, "early": 1}, {}) == {"late": 1, "early": 0}
    assert share_slots(1, {"early": 1, "late": 1}, {}) == {"early": 1, "late": 0}


def test_clients_not_asking_get_nothing():
    got = share_slots(3, {"a": 3}, {"a": 9, "b": 0})
    assert got == {"a": 3}


def test_accepted_groups_count_with_in_flight():
    # b has 4 fewer groups accepted: it gets every slot until its accepted + in flight reaches a's (7)
    assert share_slots(4, {"a": 4, "b": 4}, {"a": 2, "b": 2}, {"a": 5, "b": 1}) == {"a": 0, "b": 4}
    assert share_slots(5, {"a": 4, "b": 4}, {"a": 2, "b": 2}, {"a": 5, "b": 1}) == {"a": 1, "b": 4}
    assert share_slots(4, {"a": 4, "b": 4}, {"a": 2, "b": 2}) == {"a": 2, "b": 2}  # in flight only


def test_max_gap_holds_a_client_that_runs_ahead_even_with_free_slots():
    # b (accepted 2 + in flight 2 = 4) is the peer furthest behind; with max_gap 3 nobody may pass 7
    got = share_slots(100, {"a": 8}, {"a": 2, "b": 2}, {"a": 3, "b": 2}, max_gap=3, peers=["a", "b"])
    assert got == {"a": 2}  # a: 3 + 2 = 5, two more slots reach 7
    assert share_slots(100, {"a": 8}, {"a": 2, "b": 2}, {"a": 3, "b": 2}) == {"a": 8}  # no bound
    # when b asks too, its slots raise the floor and a may follow
    got = share_slots(100, {"a": 8, "b": 8}, {"a": 2, "b": 2}, {"a": 3, "b": 2}, max_gap=3, peers=["a", "b"])
    assert got == {"a": 8, "b": 8}


def test_max_gap_always_serves_the_client_furthest_behind():
    assert share_slots(5, {"b": 5}, {"a": 0, "b": 0}, {"a": 40, "b": 0}, max_gap=1, peers=["a", "b"]) == {"b": 5}
    assert share_slots(5, {"a": 5}, {"a": 0, "b": 0}, {"a": 40, "b": 0}, max_gap=1, peers=["a", "b"]) == {"a": 0}
    # a producer that is not a peer (silent, or no group accepted yet) holds nobody back
    assert share_slots(5, {"a": 5}, {"a": 0, "b": 0}, {"a": 40, "b": 0}, max_gap=1, peers=["a"]) == {"a": 5}
