"""Recorded-style model outputs per tool-call format, with the expected (content, [(name, arguments)]).

Written after the formats the model families emit (Qwen2.5 / Hermes `<tool_call>`, Llama 3.1-3.3 JSON,
Mistral v3 and v11 `[TOOL_CALLS]`), including parallel calls, text around calls, unicode, nested
arguments, and malformed JSON."""
from __future__ import annotations

# (format, output text, expected content, expected [(name, compact arguments)])
SAMPLES: list[tuple[str, str, object, list[tuple[str, str]]]] = [
    # --- hermes (Qwen2.5 / Hermes 2 Pro)
    ("hermes",
     '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
     '"unit": "celsius"}}\n</tool_call>',
     None, [("get_current_temperature", '{"location":"San Francisco, CA, USA","unit":"celsius"}')]),
    ("hermes",
     '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, '
     'CA, USA", "date": "2024-10-01"}}\n</tool_call>',
     None, [("get_current_temperature", '{"location":"San Francisco, CA, USA"}'),
            ("get_temperature_date", '{"location":"San Francisco, CA, USA","date":"2024-10-01"}')]),
    ("hermes",
     "I'll look up the weather in both cities for you.\n\n<tool_call>\n{\"name\": \"get_weather\", "
     "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", "
     "\"arguments\": {\"city\": \"Berlin\"}}\n</tool_call>",
     "I'll look up the weather in both cities for you.",
     [("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Berlin"}')]),
    ("hermes",
     '<tool_call>\n{"name": "translate", "arguments": {"text": "Grüße aus Zürich 🌸 東京", '
     '"note": "line\\nbreak \\"quoted\\" \\u00e9 \\\\ slash"}}\n</tool_call>',
     None, [("translate", '{"text":"Grüße aus Zürich 🌸 東京","note":"line\\nbreak \\"quoted\\" \\u00e9 \\\\ slash"}')]),
    ("hermes",
     '<tool_call>\n{"name": "search_products", "arguments": {\n  "filter": {"and": [{"field": "price", '
     '"lt": 100.5}, {"field": "tags", "in": ["a", "b"]}]},\n  "limit": 10, "desc": true, "cursor": null, '
     '"scale": -1.5e-3, "empty": {}, "none": []\n}}\n</tool_call>',
     None, [("search_products", '{"filter":{"and":[{"field":"price","lt":100.5},{"field":"tags","in":["a","b"]}]},'
                                '"limit":10,"desc":true,"cursor":null,"scale":-1.5e-3,"empty":{},"none":[]}')]),
    ("hermes",  # keys in the other order: read whole, then sent
     '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>',
     None, [("search", '{"q":"x"}')]),
    ("hermes",  # arguments as a JSON-encoded string
     '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}\n</tool_call>',
     None, [("search", '{"q":"x"}')]),
    ("hermes",  # no closing tag (stopped at EOS)
     'Checking.<tool_call>{"name": "ping", "arguments": {}}',
     "Checking.", [("ping", "{}")]),
    ("hermes",  # text after the call
     '<tool_call>{"name": "ping", "arguments": {"host": "a<b"}}</tool_call> Pinging now.',
     "Pinging now.", [("ping", '{"host":"a<b"}')]),
    ("hermes",  # tag-like text that is not a call
     "Use the <tool> tag, or <tool_calls>, or write <tool_call> yourself.",
     "Use the <tool> tag, or <tool_calls>, or write <tool_call> yourself.", []),
    ("hermes",  # malformed: unquoted name
     '<tool_call>\n{"name": get_weather, "arguments": {"city": "Paris"}}\n</tool_call>',
     '<tool_call>\n{"name": get_weather, "arguments": {"city": "Paris"}}\n</tool_call>', []),
    ("hermes",  # malformed: single quotes, Python-style
     "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>",
     "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>", []),
    ("hermes",  # malformed: trailing comma in the other key order (read whole, invalid)
     '<tool_call>{"arguments": {"a": 1,}, "name": "f"}</tool_call>',
     '<tool_call>{"arguments": {"a": 1,}, "name": "f"}</tool_call>', []),
    ("hermes",  # cut off inside the header
     'Let me see. <tool_call>\n{"name": "get_wea',
     'Let me see. <tool_call>\n{"name": "get_wea', []),
    ("hermes",  # a broken first tag, then a good one
     '<tool_call>oops<tool_call>{"name": "ok", "arguments": {"n": 1}}</tool_call>',
     "<tool_call>oops", [("ok", '{"n":1}')]),
    ("hermes", "", None, []),
    ("hermes", "Just text, no calls.\n", "Just text, no calls.\n", []),
    # --- generic (tokenmill's own; same wire format, also a list inside one tag)
    ("generic",
     'Sure! <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure!", [("get_weather", '{"city":"Paris"}')]),
    ("generic",
     '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": [true]}}]</tool_call>',
     None, [("a", '{"x":1}'), ("b", '{"y":[true]}')]),
    # --- llama3_json (Llama 3.1 / 3.2 / 3.3)
    ("llama3_json",
     '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris, France"}}',
     None, [("get_weather", '{"location":"Paris, France"}')]),
    ("llama3_json",
     '{"name": "get_weather", "parameters": {"location": "Paris"}}; {"name": "get_time", "parameters": '
     '{"timezone": "Europe/Paris"}}',
     None, [("get_weather", '{"location":"Paris"}'), ("get_time", '{"timezone":"Europe/Paris"}')]),
    ("llama3_json",  # Llama 3.2 style with a type key
     '{"type": "function", "name": "get_weather", "parameters": {"location": "Köln", "days": 3}}',
     None, [("get_weather", '{"location":"Köln","days":3}')]),
    ("llama3_json",
     'The set {1, 2} has two elements and {"a": 1} is JSON; {"name": "x"} is not a call.',
     'The set {1, 2} has two elements and {"a": 1} is JSON; {"name": "x"} is not a call.', []),
    ("llama3_json",  # an object answer, not a call
     '{"city": "Paris", "country": "France"}',
     '{"city": "Paris", "country": "France"}', []),
    ("llama3_json",  # malformed arguments key order is not a call for llama3 (no tag around it)
     '{"parameters": {"a": 1}, "name": "f"}',
     '{"parameters": {"a": 1}, "name": "f"}', []),
    # --- mistral
    ("mistral",
     '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
     '"format": "celsius"}}]',
     None, [("get_current_weather", '{"location":"Paris, France","format":"celsius"}')]),
    ("mistral",
     '[TOOL_CALLS] [{"name": "a", "arguments": {"n": [1, {"m": null}]}}, {"name": "b", "arguments": {}}]',
     None, [("a", '{"n":[1,{"m":null}]}'), ("b", "{}")]),
    ("mistral",
     '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
     None, [("get_weather", '{"city":"Paris"}'), ("get_time", '{"tz":"Europe/Paris"}')]),
    ("mistral",
     'Let me check that.[TOOL_CALLS]lookup[ARGS]{"term": "naïve café"}',
     "Let me check that.", [("lookup", '{"term":"naïve café"}')]),
    ("mistral",
     "The token [TOOL_CALLS] is special; [TOOL_CALLS]not a call",
     "The token [TOOL_CALLS] is special; [TOOL_CALLS]not a call", []),
    ("mistral",
     '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"arguments": {"b": 2}, "name": "g"}]',
     None, [("f", '{"a":1}'), ("g", '{"b":2}')]),
]

# malformed JSON inside the arguments (after the call's header): with stream_arguments=False the whole
# call is content; with streaming on, the call keeps the valid prefix of its arguments
MALFORMED_ARGS: list[tuple[str, str, str]] = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>', '{"city":'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>', '{"a":1,'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>', '{"a":'),
    ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2}}', '{"a":[1,2'),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": "unterminated', '{"a":"unterminated'),
]
