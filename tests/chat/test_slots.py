"""Schema narrowing for small models: pure functions, checked on the real sales_report schema."""

import jsonschema

from services.chat.slots import narrow_schema, pin_enums
from services.tools.builtin.sales_report import SCHEMA


def enums(question: str) -> dict:
    return {k: v.get("enum") for k, v in narrow_schema(SCHEMA, question)["properties"].items()}


def test_named_values_are_pinned_most_specific_first():
    assert enums("How many deals did we close last month, by region?") == {
        "period": ["last_month"], "group_by": ["region"], "metric": ["deals_closed"]}
    assert enums("revenue by product this quarter") == {"period": ["this_quarter"], "group_by": ["product"]}


def test_required_parameter_stays_open_when_not_named():
    narrowed = narrow_schema(SCHEMA, "what were sales like?")
    assert set(narrowed["properties"]) == {"period"}
    assert "last_month" in narrowed["properties"]["period"]["enum"]
    assert narrowed["required"] == ["period"] and narrowed["additionalProperties"] is False


def test_ambiguous_values_are_left_to_the_model():
    props = {"unit": {"enum": ["celsius", "fahrenheit"]}}
    assert pin_enums(props, "celsius or fahrenheit?") == {}


def test_everything_the_narrowed_schema_allows_is_valid_for_the_tool():
    narrowed = narrow_schema(SCHEMA, "How many deals did we close last month, by region?")
    args = {name: prop["enum"][0] for name, prop in narrowed["properties"].items()}
    jsonschema.validate(args, SCHEMA)


def test_free_form_strings_are_bounded_for_small_models():
    schema = {"type": "object", "required": ["to", "body"],
              "properties": {"to": {"type": "string"}, "body": {"type": "string", "maxLength": 5000}}}
    narrowed = narrow_schema(schema, "send an email to bob")
    assert narrowed["properties"]["to"]["maxLength"] == 200
    assert narrowed["properties"]["body"]["maxLength"] == 200
