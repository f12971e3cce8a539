"""The headless runner on fake nodes: order, caching, and one test per error message."""

import pytest

from nodes import host
from nodes.runner import NodeFailedError, Runner, all_node_classes
from nodes.workflow import WorkflowError, parse_workflow


def sampler_prompt(seed=5, sampler_name="euler"):
    return {
        "1": {"class_type": "FakeModelLoader", "inputs": {"name": "tiny"}},
        "2": {
            "class_type": "FakeSampler",
            "inputs": {"model": ["1", 0], "seed": seed, "steps": 3, "sampler_name": sampler_name, "cfg": 7},
        },
        "3": {"class_type": "FakeCollect", "inputs": {"value": ["2", 0]}},
    }


def test_api_workflow_runs_dependencies_first_with_kwargs(fake_nodes, calls):
    result = Runner(fake_nodes).run(sampler_prompt())
    assert result.executed == ["1", "2", "3"]
    assert result.outputs["2"] == (8,)
    assert result.ui == {"3": {"values": [8]}}
    sampler_kwargs = calls[1][1]
    assert sampler_kwargs["model"] == {"model": "tiny"}
    assert sampler_kwargs["cfg"] == 7.0 and isinstance(sampler_kwargs["cfg"], float)
    assert "add_noise" in sampler_kwargs and sampler_kwargs["add_noise"] is True  # function default


def test_hidden_inputs_receive_prompt_and_node_id(fake_nodes, calls):
    Runner(fake_nodes).run(sampler_prompt())
    assert calls[-1] == ("FakeCollect", {"value": 8, "unique_id": "3"})


def test_one_output_feeding_two_branches_runs_once(fake_nodes, calls):
    prompt = {
        "1": {"class_type": "FakeConstant", "inputs": {"value": 4}},
        "2": {"class_type": "FakeAdd", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "3": {"class_type": "FakeCollect", "inputs": {"value": ["2", 0]}},
        "4": {"class_type": "FakeCollect", "inputs": {"value": ["1", 0]}},
    }
    result = Runner(fake_nodes).run(prompt)
    assert [c[0] for c in calls].count("FakeConstant") == 1
    assert result.ui["3"] == {"values": [8]} and result.ui["4"] == {"values": [4]}


def test_nodes_no_output_depends_on_are_not_run(fake_nodes, calls):
    prompt = sampler_prompt()
    prompt["9"] = {"class_type": "FakeConstant", "inputs": {"value": 1}}
    result = Runner(fake_nodes).run(prompt)
    assert "9" not in result.executed
    assert Runner(fake_nodes).run(prompt, outputs=["9"]).outputs["9"] == (1,)


def test_second_run_reuses_cached_outputs_but_output_nodes_run(fake_nodes):
    runner = Runner(fake_nodes)
    runner.run(sampler_prompt())
    again = runner.run(sampler_prompt())
    assert again.cached == ["1", "2"] and again.executed == ["3"]
    assert again.ui == {"3": {"values": [8]}}


def test_changed_input_reruns_only_that_node_and_downstream(fake_nodes):
    runner = Runner(fake_nodes)
    runner.run(sampler_prompt(seed=5))
    changed = runner.run(sampler_prompt(seed=6))
    assert changed.cached == ["1"] and changed.executed == ["2", "3"]
    assert changed.ui["3"] == {"values": [9]}


def test_is_changed_nan_always_reruns(fake_nodes, calls):
    prompt = {
        "1": {"class_type": "FakeVolatile", "inputs": {"value": 3}},
        "2": {"class_type": "FakeCollect", "inputs": {"value": ["1", 0]}},
    }
    runner = Runner(fake_nodes)
    runner.run(prompt)
    assert runner.run(prompt).executed == ["1", "2"]


def error_of(fake_nodes, prompt) -> str:
    with pytest.raises(WorkflowError) as caught:
        Runner(fake_nodes).run(prompt)
    return str(caught.value)


def test_unknown_node_type_lists_known_types(fake_nodes):
    prompt = sampler_prompt()
    prompt["2"]["class_type"] = "KSampler"
    message = error_of(fake_nodes, prompt)
    assert message.startswith("node 2 (KSampler): unknown node type 'KSampler'. Known node types: ")
    assert "FakeAdd, FakeBroken" in message


def test_dangling_link_to_missing_node(fake_nodes):
    prompt = sampler_prompt()
    prompt["2"]["inputs"]["model"] = ["7", 0]
    assert error_of(fake_nodes, prompt) == (
        "node 2 (FakeSampler), input 'model': linked to node 7, which is not in the workflow"
    )


def test_dangling_link_to_missing_output_index(fake_nodes):
    prompt = sampler_prompt()
    prompt["2"]["inputs"]["model"] = ["1", 2]
    assert error_of(fake_nodes, prompt) == (
        "node 2 (FakeSampler), input 'model': linked to output 2 of node 1 (FakeModelLoader), "
        "which has 2 output(s): FAKE_MODEL, INT"
    )


def test_link_of_the_wrong_type(fake_nodes):
    prompt = sampler_prompt()
    prompt["2"]["inputs"]["model"] = ["1", 1]
    assert error_of(fake_nodes, prompt) == (
        "node 2 (FakeSampler), input 'model': expected FAKE_MODEL, but output 1 of node 1 "
        "(FakeModelLoader) is INT"
    )


def test_missing_required_input(fake_nodes):
    prompt = sampler_prompt()
    del prompt["2"]["inputs"]["steps"]
    assert error_of(fake_nodes, prompt) == (
        "node 2 (FakeSampler), input 'steps': missing required input (expected INT)"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("seed", "42", "expected an INT, got '42' (str)"),
        ("seed", 1.5, "expected an INT, got 1.5 (float)"),
        ("seed", True, "expected an INT, got True (bool)"),
        ("steps", 0, "expected an INT >= 1, got 0 (int)"),
        ("cfg", "high", "expected a FLOAT, got 'high' (str)"),
        ("cfg", 31, "expected a FLOAT <= 30.0, got 31.0 (float)"),
        ("add_noise", 1, "expected a BOOLEAN (true or false), got 1 (int)"),
        ("note", 3, "expected a STRING, got 3 (int)"),
        ("model", "tiny", "expected a link from a node output of type FAKE_MODEL, got 'tiny' (str)"),
    ],
)
def test_wrong_value_type_names_node_input_and_expectation(fake_nodes, name, value, expected):
    prompt = sampler_prompt()
    prompt["2"]["inputs"][name] = value
    assert error_of(fake_nodes, prompt) == f"node 2 (FakeSampler), input '{name}': {expected}"


def test_combo_value_not_in_list_names_the_choices(fake_nodes):
    assert error_of(fake_nodes, sampler_prompt(sampler_name="dpm")) == (
        "node 2 (FakeSampler), input 'sampler_name': expected one of: 'euler', 'ddim', got 'dpm' (str)"
    )


def test_integral_float_is_accepted_as_int(fake_nodes, calls):
    Runner(fake_nodes).run(sampler_prompt(seed=5.0))
    assert calls[1][1]["seed"] == 5 and isinstance(calls[1][1]["seed"], int)


def test_cycle_names_the_nodes_in_it(fake_nodes):
    prompt = {
        "1": {"class_type": "FakeAdd", "inputs": {"a": ["2", 0], "b": ["4", 0]}},
        "2": {"class_type": "FakeAdd", "inputs": {"a": ["1", 0], "b": ["4", 0]}},
        "3": {"class_type": "FakeCollect", "inputs": {"value": ["2", 0]}},
        "4": {"class_type": "FakeConstant", "inputs": {"value": 1}},
    }
    assert error_of(fake_nodes, prompt) == (
        "the workflow has a cycle: 2 (FakeAdd) -> 1 (FakeAdd) -> 2 (FakeAdd)"
    )


def test_workflow_without_output_node(fake_nodes):
    prompt = {"1": {"class_type": "FakeConstant", "inputs": {"value": 1}}}
    assert "has no output node" in error_of(fake_nodes, prompt)


def test_malformed_link(fake_nodes):
    prompt = sampler_prompt()
    prompt["3"]["inputs"]["value"] = ["2", 0, 1]
    assert error_of(fake_nodes, prompt) == (
        "node 3 (FakeCollect), input 'value': expected a link [node_id, output_index], got ['2', 0, 1]"
    )


def test_not_a_workflow_at_all(fake_nodes):
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        parse_workflow({"hello": "world"}, fake_nodes)


def test_node_exception_is_wrapped_with_node_id_and_class(fake_nodes):
    prompt = {
        "1": {"class_type": "FakeConstant", "inputs": {"value": 1}},
        "2": {"class_type": "FakeBroken", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "FakeCollect", "inputs": {"value": ["2", 0]}},
    }
    with pytest.raises(NodeFailedError) as caught:
        Runner(fake_nodes).run(prompt)
    assert str(caught.value) == "node 2 (FakeBroken): failed: ValueError: weights are missing"
    assert isinstance(caught.value.__cause__, ValueError)


def test_function_returning_the_wrong_number_of_outputs(fake_nodes):
    prompt = {
        "1": {"class_type": "FakeWrongArity", "inputs": {}},
        "2": {"class_type": "FakeCollect", "inputs": {"value": ["1", 1]}},
    }
    assert error_of(fake_nodes, prompt) == (
        "node 1 (FakeWrongArity): make() returned (1,), expected a tuple of 2 value(s) (INT, INT)"
    )


def test_cancel_stops_before_the_next_node(fake_nodes, calls):
    prompt = {
        "1": {"class_type": "FakeConstant", "inputs": {"value": 1}},
        "2": {"class_type": "FakeCancelling", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "FakeAdd", "inputs": {"a": ["2", 0], "b": ["1", 0]}},
        "4": {"class_type": "FakeCollect", "inputs": {"value": ["3", 0]}},
    }
    with pytest.raises(host.Cancelled):
        Runner(fake_nodes).run(prompt)
    assert [c[0] for c in calls] == ["FakeConstant"]
    Runner(fake_nodes).run(sampler_prompt())  # the request was consumed: the next run works


def test_default_mapping_is_the_pack_registry_plus_runner_nodes():
    from nodes.registry import NODE_CLASS_MAPPINGS

    classes = all_node_classes()
    assert {"LoadImage", "SaveImage", "PreviewImage"} <= set(classes)
    assert set(NODE_CLASS_MAPPINGS) <= set(classes)
    assert not {"LoadImage", "SaveImage", "PreviewImage"} & set(NODE_CLASS_MAPPINGS)
