"""What the documentation names exists as it says: the tools' options, subcommands, choices and
defaults, the node's parameters with their defaults, ranges and choices, the launch file's
arguments, the files and Python names the docs point to, and the speed figures: the README's
quotes of docs/performance.md and the ratios the speed tables give beside their figures.

The docs are the user's interface as much as the parsers are; a renamed option or parameter left
in a command line there fails at the user's first try. The checks read the parsers, SPECS and the
launch file's source in this process (no ROS, no subprocess). docs/quality.md and
docs/training-history.md are records of past runs and are not checked.
"""

import argparse
import ast
import fnmatch
import glob
import importlib
import importlib.util
import math
import re
import shlex

import pytest
import yaml

from paths import REPO
from s4fusion_ros import settings
from s4fusion_ros.settings import SPECS

DOCS = ('README.md', 'docs/node.md', 'docs/batch.md', 'docs/evaluation.md', 'docs/training.md',
        'docs/performance.md', 'docs/architecture.md')
# Console tools (setup.py) and the scripts the docs run, by the module that builds the parser.
TOOLS = {
    's4fusion-fuse': 's4fusion_ros.tools.fuse',
    's4fusion-eval': 's4fusion_ros.tools.evaluate',
    's4fusion-bag': 's4fusion_ros.tools.bag',
    's4fusion-batch': 's4fusion_ros.tools.batch',
    's4fusion-train': 's4fusion_ros.tools.train',
    's4fusion-bench': 's4fusion_ros.tools.bench',
    's4fusion-play': 's4fusion_ros.ros.player',
    's4fusion-demo': 's4fusion_ros.ros.demo',
    's4fusion-flood': 's4fusion_ros.ros.flood',
    'scripts/gpu_train.py': REPO / 'scripts' / 'gpu_train.py',
    'scripts/detection_check.py': REPO / 'scripts' / 'detection_check.py',
}
NODE = 's4fusion_node'  # takes ROS arguments only (run_node.command_line_help)
NODE_OPTIONS = ('-h', '--help', '--ros-args')
PARAMETER_GROUPS = sorted({name.split('.')[0] for name in SPECS if '.' in name})


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser a tool built."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _capture(parser, args=None, namespace=None):
    raise _Parsed(parser)


@pytest.fixture(scope='module')
def parsers():
    """Each tool's argparse parser, as its own entry point builds it: its parse_args stops at
    the parsing, so nothing runs."""
    built = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, 'parse_args', _capture)
        for tool, source in TOOLS.items():
            if isinstance(source, str):
                module = importlib.import_module(source)
            else:
                spec = importlib.util.spec_from_file_location(source.stem, source)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            if hasattr(module, 'build_parser'):
                built[tool] = module.build_parser()
                continue
            with pytest.raises(_Parsed) as parsed:
                (getattr(module, 'parse_args', None) or module.main)([])
            built[tool] = parsed.value.parser
    return built


FENCE = re.compile(r'^```([^\n]*)\n(.*?)^```', re.M | re.S)
SPAN = re.compile(r'`([^`]+)`')


def doc(name: str) -> str:
    return (REPO / name).read_text()


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in FENCE.finditer(text):
        if block.group(1) == 'bash':
            joined = re.sub(r'\\\n\s*', ' ', block.group(2))
            lines += [re.sub(r'(^|\s)#.*', '', line) for line in joined.splitlines()]
    return lines


def prose(text: str) -> str:
    """The text outside fenced blocks, lines joined (a code span may wrap)."""
    return FENCE.sub('', text).replace('\n', ' ')


def paragraphs(text: str) -> list[str]:
    return [part.replace('\n', ' ') for part in re.split(r'\n\s*\n', FENCE.sub('', text))]


def spans(text: str) -> list[str]:
    return SPAN.findall(prose(text))


def tokens_of(segment: str) -> list[str]:
    try:
        return shlex.split(segment)
    except ValueError:  # an apostrophe in prose around a span
        return segment.split()


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(tool, its arguments) of every command line naming one of ours, in bash blocks and in
    code spans."""
    found = []
    for line in shell_lines(text) + spans(text):
        for segment in re.split(r'\||&&|;|\$\(|\)', line):
            tokens = tokens_of(segment)
            for index, token in enumerate(tokens):
                name = re.sub(r'^\.?venv/bin/', '', token)
                if name in TOOLS or name == NODE:
                    found.append((name, tokens[index + 1:]))
                    break
    return found


def placeholder(value: str) -> bool:
    """IVIF_DIR, N, IN..., $OUT: a value the reader fills in."""
    return value.isupper() or value.endswith('...') or value.startswith('$')


def subcommands(parser) -> dict:
    return next((action.choices for action in parser._actions
                 if isinstance(action, argparse._SubParsersAction)), {})


def all_parsers(parser) -> list:
    """A parser and its subcommands' parsers."""
    return [parser, *subcommands(parser).values()]


def listed_values() -> dict:
    """The names options of comma-separated names take, which their tool checks after
    parsing (`--datasets msrs22`)."""
    from s4fusion_ros.tools import evaluate
    return {('s4fusion-eval', '--methods'): evaluate.METHODS,
            ('s4fusion-eval', '--datasets'): evaluate.IVIF_DATASETS}


def argument_problems(tool: str, parser, arguments: list[str]) -> list[str]:
    """What of `arguments` the tool's parser does not take: an option, a subcommand, a choice."""
    problems = []
    arguments = [argument.strip('[]') for argument in arguments]
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument == '--':  # what follows goes to another program (gpu_train.py's runs)
            break
        if not argument.startswith('-') or re.fullmatch(r'-[\d.]+', argument):
            if subcommands(parser) and not placeholder(argument):
                if argument not in subcommands(parser):
                    return problems + [f'subcommand {argument!r}']
                parser = subcommands(parser)[argument]
            continue
        option, _, attached = argument.partition('=')
        action = parser._option_string_actions.get(option)
        if action is None:
            problems.append(f'option {option}')
            continue
        values = [attached] if attached else []
        many = action.nargs in ('+', '*')
        while (action.nargs != 0 and index < len(arguments)
               and not arguments[index].startswith('-') and (many or not values)):
            values.append(arguments[index])
            index += 1
        allowed = action.choices
        if (tool, option) in listed_values():
            allowed = listed_values()[(tool, option)]
            values = [name for value in values for name in value.split(',')]
        if allowed is not None:
            problems += [f'{option} {value!r} (choices: {", ".join(map(str, allowed))})'
                         for value in values if not placeholder(value) and value not in allowed]
    return problems


def test_every_documented_command_line_uses_options_its_tool_has(parsers):
    problems, checked = [], 0
    for name in DOCS:
        for tool, arguments in commands(doc(name)):
            if tool == NODE:  # ROS arguments only, after --ros-args
                own = arguments[:arguments.index('--ros-args')] if '--ros-args' in arguments \
                    else arguments
                problems += [f'{name}: {NODE} {argument}' for argument in own
                             if argument not in NODE_OPTIONS]
                continue
            checked += 1
            problems += [f'{name}: {tool} {" ".join(arguments)}: {problem}'
                         for problem in argument_problems(tool, parsers[tool], arguments)]
    assert checked > 100  # the extraction still finds the docs' commands
    assert not problems, '\n'.join(problems)


# Options of other programs that the docs give in code spans of their own.
OTHER_PROGRAMS = {
    '-n': 'pytest (-n 0: pytest-xdist off)', '-rs': 'pytest', '-m': 'pytest',
    '--system-site-packages': 'python -m venv', '--symlink-install': 'colcon build',
    '--node-ip-address': 'ray start',
    # ROS arguments of the node
    '--ros-args': NODE, '--params-file': NODE, '-r': NODE, '-p': NODE,
}


def test_options_named_alone_in_the_docs_are_options_of_ours(parsers):
    # `--segment-minutes`, `--ray local`: in prose, the tool is the paragraph's, which a reader
    # infers; any of our tools' options (with its choices) is taken, so a removed or renamed one
    # is found.
    options = {}
    for tool, parser in parsers.items():
        for each in all_parsers(parser):
            for option, action in each._option_string_actions.items():
                options.setdefault(option, []).append((tool, action))
    problems = []
    for name in DOCS:
        for span in spans(doc(name)):
            if not span.startswith('-') or span.split()[0] == '--' or re.match(r'-\d', span):
                continue
            option, *values = span.replace('=', ' ', 1).split()
            if option in OTHER_PROGRAMS:
                continue
            if option not in options:
                problems.append(f'{name}: `{span}`: no tool of the package has {option}')
                continue
            values = [value for value in values[:1] if not placeholder(value)]
            if values and all(action.choices is not None and values[0] not in action.choices
                              for _, action in options[option]):
                problems.append(f'{name}: `{span}`: {values[0]} is not a choice of {option}')
    assert not problems, '\n'.join(problems)


DEFAULT_CLAIM = re.compile(
    r'`(--[\w-]+)(?: ([^`]*))?`(?:,?\s+\(?default:?\s+([\w.]+)|,\s+([\w.]+)\s+by default'
    r'|\s+\(the default\))')


def same_value(stated: str, default) -> bool:
    if isinstance(default, bool) or default is None:
        return str(default).lower() == stated.lower()
    if isinstance(default, (int, float)):
        try:
            return math.isclose(float(stated), default)
        except ValueError:
            return False
    return str(default) == stated


def test_defaults_the_docs_give_options_are_the_parsers(parsers):
    # `--segment-minutes` (default 10), `--cpus-per-task`, 1 by default, `--ray local` (the
    # default): one of the tools with that option has that default.
    defaults = {}
    for parser in parsers.values():
        for each in all_parsers(parser):
            for option, action in each._option_string_actions.items():
                defaults.setdefault(option, []).append(action.default)
    problems, checked = [], 0
    for name in DOCS:
        for claim in DEFAULT_CLAIM.finditer(prose(doc(name))):
            option, value, stated, by_default = claim.groups()
            stated = stated or by_default or value
            checked += 1
            if not any(same_value(stated, default) for default in defaults.get(option, [])):
                problems.append(f'{name}: {claim.group(0)!r}: the parsers give '
                                f'{defaults.get(option)}')
    assert checked >= 5
    assert not problems, '\n'.join(problems)


def test_every_numeric_option_default_is_in_its_help(parsers):
    # `--help` is where a user looks a default up first: an option with a number for a default
    # says it there, in its text or by the formatter (`s4fusion-flood --duration`, `s4fusion-eval
    # --limit` and `s4fusion-fuse --detail-gain` did not).
    problems = []
    for tool, parser in parsers.items():
        if not tool.startswith('s4fusion-'):  # the console tools (setup.py), not the scripts
            continue
        for each in all_parsers(parser):
            shown = issubclass(each.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
            problems += [f'{each.prog} {action.option_strings[0]}' for action in each._actions
                         if action.option_strings and action.help
                         and isinstance(action.default, (int, float))
                         and not isinstance(action.default, bool)
                         and not shown and 'default' not in action.help]
    assert not problems, '\n'.join(problems)


PARAMETER = re.compile(rf'^({"|".join(PARAMETER_GROUPS)})\.[\w.*<>]+$')
FILE_NAME = re.compile(r'\.(py|yaml|md|json|csv|png|xml|safetensors|mp4|db3|mcap)$')


def declared(name: str) -> bool:
    """Whether SPECS has `name`, or for `group.*`, a parameter under it."""
    return any(fnmatch.fnmatchcase(spec, name) for spec in SPECS)


MENTION = re.compile(r'(?<![\w./~:-])([a-z_][\w.*<>]*)(?:(:=|: +)([^\s,;)]+))?')


def parameter_mentions(text: str) -> list[tuple[str, str | None]]:
    """(name, value or None) of the node parameters in code spans and bash lines:
    `sync.slop`, `thermal.transport: compressed`, `-p device:=cuda`, `half:=true`."""
    found = []
    for span in spans(text) + shell_lines(text):
        for mention in MENTION.finditer(span):
            name, separator, value = mention.groups()
            if separator != ':=' and mention.group(0) != span.strip():
                value = None  # `name: value` as a whole span, not inside a quoted message
            if (PARAMETER.match(name) and not FILE_NAME.search(name)) or (
                    separator and name in SPECS):
                found.append((name, value))
    return found


# node.md shows what the node answers to a mistyped name.
ILLUSTRATED_TYPOS = {'sync.slopp'}


def test_parameters_the_docs_name_are_declared_and_take_the_values_given():
    problems, checked = [], 0
    for name in DOCS:
        for parameter, value in parameter_mentions(doc(name)):
            checked += 1
            if parameter in ILLUSTRATED_TYPOS:
                continue
            if not declared(parameter):
                problems.append(f'{name}: {parameter} is not a parameter of the node')
            elif value is not None and not value.startswith('['):
                given = settings.as_declared(parameter, yaml.safe_load(value))
                reason = settings.check_types({parameter: given}) or settings.check(
                    {parameter: given})
                if reason:
                    problems.append(f'{name}: {parameter}: {value}: {reason}')
    assert checked > 50
    assert not problems, '\n'.join(problems)


def stated_value(text: str):
    """A default as the docs write it: `auto`, 0.05, 0.5 s, empty, `[0, 0]`, 2^25."""
    text = text.strip().strip('`').removesuffix(' s').strip('`')
    if text == 'empty':
        return ''
    if re.fullmatch(r'\d+\^\d+', text):
        base, power = text.split('^')
        return int(base) ** int(power)
    return yaml.safe_load(text)


def equal(stated, default) -> bool:
    if isinstance(default, float) and isinstance(stated, (int, float)):
        return math.isclose(stated, default)
    return stated == default and type(stated) is type(default)


def test_the_readme_parameter_table_gives_the_declared_defaults_and_values():
    rows = re.findall(r'^\| (`[^|]*) \| ([^|]*) \| ([^|]*) \|$', doc('README.md'), re.M)
    problems, checked = [], set()
    for names_cell, defaults_cell, notes in rows:
        names = [name for name in SPAN.findall(names_cell) if name in SPECS]
        if not names or not defaults_cell.strip():
            continue  # a topic's row, or qos_overrides (no default of its own)
        defaults = defaults_cell.split(' / ')
        if len(defaults) == 1:  # `thermal.transport`, `visible.transport` | `raw`
            defaults *= len(names)
        assert len(defaults) == len(names), names_cell
        for name, stated in zip(names, defaults):
            checked.add(name)
            if not equal(stated_value(stated), SPECS[name].default):
                problems.append(f'{name}: the table says {stated.strip()}, SPECS '
                                f'{SPECS[name].default!r}')
        # The values a row offers (`cpu`, `cuda:N`, `keep_oldest`, `1.0`) are some parameter's
        # of the row; a word naming part of a parameter (`fixed_min`) is not a value.
        for value in SPAN.findall(notes):
            if ' ' in value or '/' in value or any(spec.endswith('.' + value) for spec in SPECS):
                continue
            given = yaml.safe_load(value.replace('cuda:N', 'cuda:0'))
            if all(settings.check_types({name: settings.as_declared(name, given)})
                   or settings.check({name: settings.as_declared(name, given)})
                   for name in names):
                problems.append(f'{names_cell.strip()}: {value} is no value of theirs')
    assert len(checked) >= 15
    assert not problems, '\n'.join(problems)


PARAMETER_DEFAULT = re.compile(r'`([\w.]+)`(?:,\s+default|\s+\(default:?)\s+([\w.^]+)')


def test_defaults_the_docs_give_parameters_in_prose_are_declared():
    # `inference.queue_size`, default 1; `saliency.contrast` (default 0.2); `max_input_pixels`
    # (default 2^25
    problems, checked = [], 0
    for name in DOCS:
        for parameter, stated in PARAMETER_DEFAULT.findall(prose(doc(name))):
            if parameter not in SPECS:
                continue
            checked += 1
            if not equal(stated_value(stated.rstrip('.')), SPECS[parameter].default):
                problems.append(f'{name}: {parameter} (default {stated}): SPECS has '
                                f'{SPECS[parameter].default!r}')
    assert checked >= 3
    assert not problems, '\n'.join(problems)


def top_level(text: str) -> str:
    """`text` without its parenthesized asides, nested ones too."""
    while re.search(r'\([^()]*\)', text):
        text = re.sub(r'\([^()]*\)', '', text)
    return text


def named_parameters(text: str) -> set:
    """The parameters a list of code spans names, `normalization.*` expanded."""
    return {spec for name in SPAN.findall(text) if PARAMETER.match(name) or name in SPECS
            for spec in SPECS if fnmatch.fnmatchcase(spec, name)}


def test_the_docs_lists_of_run_time_and_read_only_parameters_are_the_declared_ones():
    runtime = {name for name, spec in SPECS.items() if spec.runtime}
    readme = next(part for part in paragraphs(doc('README.md'))
                  if 'can be changed at run time' in part)
    assert named_parameters(readme.split('can be changed at run time')[0]) == runtime
    node = paragraphs(doc('docs/node.md'))
    read_only = next(part for part in node if part.startswith('Read-only (set at start):'))
    assert named_parameters(top_level(read_only)) == set(SPECS) - runtime
    changeable = next(part for part in node if part.startswith('Changeable at run time'))
    listed = top_level(changeable).split(':', 1)[1].split('. ')[0]
    assert named_parameters(listed) == runtime


def test_the_choices_config_yaml_lists_are_the_declared_ones():
    # `transport: raw  # raw | compressed | compressedDepth (16-bit PNG) | zstd`
    path, problems, checked = [], [], 0
    for line in (REPO / 'config' / 's4fusion.yaml').read_text().splitlines():
        entry = re.match(r'^( *)([\w/*]+):(.*?)(?:#(.*))?$', line)
        if entry is None:
            continue
        depth = len(entry.group(1)) // 2
        path[depth:] = [entry.group(2)]
        name = '.'.join(path[2:])
        comment = entry.group(4) or ''
        if name not in SPECS or '|' not in comment:
            continue
        checked += 1
        listed = [re.sub(r'\(.*', '', choice).split()[0] for choice in comment.split('|')]
        spec = SPECS[name]
        if name == 'device':
            wrong = [choice for choice in listed
                     if not settings.DEVICE_FORM.fullmatch(choice.replace(':N', ':0'))]
        else:
            wrong = sorted(set(listed) ^ set(spec.choices))
        if wrong:
            problems.append(f'{name}: the file lists {listed}, SPECS {spec.choices}')
    assert checked >= 8
    assert not problems, '\n'.join(problems)


def launch_arguments() -> dict:
    """name: default (None where not a literal) of the launch file's DeclareLaunchArgument
    calls, read from its source: the launch package comes with a ROS 2 distro only."""
    tree = ast.parse((REPO / 'launch' / 's4fusion.launch.py').read_text())
    declared_arguments = {}
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and getattr(call.func, 'id', None)
                == 'DeclareLaunchArgument'):
            default = next((keyword.value for keyword in call.keywords
                            if keyword.arg == 'default_value'), None)
            declared_arguments[call.args[0].value] = (
                default.value if isinstance(default, ast.Constant) else None)
    return declared_arguments


def test_the_readme_lists_the_launch_files_arguments_with_their_defaults():
    arguments = launch_arguments()
    assert len(arguments) >= 10
    paragraph = next(part for part in paragraphs(doc('README.md'))
                     if 'Launch arguments:' in part)
    listed = paragraph.split('Launch arguments:')[1].split('Included from')[0]
    assert SPAN.findall(top_level(listed)) == list(arguments)
    for name, stated in re.findall(r'`(\w+)` \(default:? [^`(]*`([^`]+)`', listed):
        if arguments[name] is not None:
            assert stated == arguments[name], name
        else:  # params_file: the installed parameters file
            assert name == 'params_file' and stated == 'config/s4fusion.yaml'


def test_launch_and_node_arguments_given_with_colon_equals_exist():
    # `ros2 launch s4fusion_ros s4fusion.launch.py thermal_topic:=...`,
    # `input_reliability:=best_effort`, `-p device:=cuda`; remappings (a / or ~) aside.
    arguments = launch_arguments()
    problems = []
    for name in DOCS:
        text = doc(name)
        for line in shell_lines(text) + spans(text):
            for given in re.findall(r'(?<![^\s(])([^\s(]+):=', line):
                remap = re.search(r'[/~]|^__', given)  # -r thermal/image_raw:=..., __ns
                if (remap or placeholder(given) or given in SPECS or given in arguments
                        or given == 'use_sim_time'):
                    continue
                problems.append(f'{name}: {given}:= in {line.strip()!r}')
    assert not problems, '\n'.join(problems)


PATH = re.compile(r'(?<![\w./:$-])((?:s4fusion_ros|scripts|test|docs|config|launch)/[\w.*{},/-]*)')


def expand_braces(path: str) -> list[str]:
    """`msrs/{ir,vi}` -> msrs/ir, msrs/vi."""
    group = re.search(r'\{([^{}]*)\}', path)
    if group is None:
        return [path]
    return [expanded for choice in group.group(1).split(',') for expanded in
            expand_braces(path[:group.start()] + choice + path[group.end():])]


def tree_paths(text: str) -> list[str]:
    """The files and folders of docs/architecture.md's layout block, by their indentation."""
    block = next(block.group(2) for block in FENCE.finditer(text)
                 if block.group(2).startswith('s4fusion_ros/'))
    found, parents = [], []
    for line in block.splitlines():
        entry = re.match(r'^( {0,4})([\w.]+/?)(?: {2,}| *$)', line)
        if entry is None or len(entry.group(1)) % 2:
            continue
        depth = len(entry.group(1)) // 2
        parents[depth:] = [entry.group(2).rstrip('/')]
        found.append('/'.join(parents))
    return found


def test_files_the_docs_name_exist():
    problems = []
    for name in DOCS:
        text = doc(name)
        named = [path.rstrip('.,') for path in PATH.findall(text)]
        # `test_scan.py` (14), `evaluation/baselines.py`: a test module, a module of the package
        named += [f'test/{span}' for span in spans(text) if re.fullmatch(r'test_\w+\.py', span)]
        named += [f's4fusion_ros/{span}' for span in spans(text)
                  if re.fullmatch(r'(\w+/)+\w+\.py', span) and not PATH.match(span)]
        if name == 'docs/architecture.md':
            named += tree_paths(text)
        problems += [f'{name}: {path}' for path in named
                     if not any(glob.glob(str(REPO / each)) for each in expand_braces(path))]
    assert not problems, '\n'.join(problems)


def module_file(module: str):
    """The source file of a module of the package, or None."""
    base = REPO.joinpath(*module.split('.'))
    return next((path for path in (base.with_suffix('.py'), base / '__init__.py')
                 if path.is_file()), None)


def top_level_names(path) -> set:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split('.')[0] for alias in node.names}
    return names


def python_names(text: str) -> list[tuple[str, str | None]]:
    """(module, name or None) the docs name: `python -m s4fusion_ros.precompile`,
    `s4fusion_ros.model.checkpoint.convert_checkpoint(...)`, `from s4fusion_ros.engine import
    FusionEngine`, `s4fusion_ros/engine.py`, `FusionPipeline`."""
    found = []
    for names in re.findall(r'from (s4fusion_ros[\w.]*) import ([\w, ]+)', text):
        found += [(names[0], name.strip()) for name in names[1].split(',') if name.strip()]
    for dotted in re.findall(r'(?<![\w/])s4fusion_ros(?:\.\w+)+', text):
        parts = dotted.split('.')
        # the longest prefix that is a module; the part after it a name in it
        length = max(length for length in range(1, len(parts) + 1)
                     if module_file('.'.join(parts[:length])) or length == 1)
        found.append(('.'.join(parts[:length]),
                      parts[length] if length < len(parts) else None))
    for path, name in re.findall(r'`([\w/]+)\.py`,? `(\w+)`', prose(text)):
        module = path.replace('/', '.')
        found.append((module if module.startswith('s4fusion_ros') else f's4fusion_ros.{module}',
                      name))
    return found


def test_python_modules_and_names_the_docs_give_exist():
    problems, checked = [], 0
    for name in DOCS:
        for module, attribute in python_names(doc(name)):
            checked += 1
            path = module_file(module)
            if path is None:
                problems.append(f'{name}: no module {module}')
            elif attribute is not None and attribute not in top_level_names(path):
                problems.append(f'{name}: {module} has no {attribute}')
    assert checked >= 10
    assert not problems, '\n'.join(problems)


def table_with(text: str, row: str) -> dict[str, list[str]]:
    """The Markdown table of `text` with a row (the header included) whose first cell starts
    with `row`: its cells by row, under each row's first cell."""
    for block in re.split(r'\n\s*\n', text):
        lines = [line for line in block.splitlines() if line.startswith('|')]
        rows = {cells[0]: cells[1:] for cells in (
            [cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in lines[:1] + lines[2:])}
        if any(name.startswith(row) for name in rows):
            return rows
    raise AssertionError(f'no table with a row {row!r}')


def near(stated: str, measured: float) -> bool:
    """Whether `stated` is `measured` rounded to the digits it shows (either way at a 5)."""
    digits = len(stated.partition('.')[2])
    return abs(float(stated) - measured) <= 0.5 * 10 ** -digits + 1e-9


CPU_SPEED = "compact (the node's CPU default), 640x480, frames/s"
GPU_KERNEL = 'authors, fp16 autocast, mamba-ssm kernel, ms (frames/s)'
GPU_CHUNKED = 'authors, fp16, chunked PyTorch scan (no mamba-ssm), ms (frames/s)'


def test_speed_figures_the_readme_quotes_are_those_of_docs_performance_md():
    # The README quotes docs/performance.md's tables in prose: the node's CPU step rate (network /
    # step cells), and the slow-down without mamba-ssm, a ratio of two rows at the size it names
    # (the whole network's time, at 320x240 much less than at camera sizes).
    performance, readme = doc('docs/performance.md'), prose(doc('README.md'))
    steps = [cell.split(' / ')[1] for cell in table_with(performance, CPU_SPEED)[CPU_SPEED]]
    claim = re.search(r"the node's whole step fuses 640x480 at about ([\d.]+)\s+pairs/s on one "
                      r'thread, ([\d.]+) on two', readme)
    assert claim, 'the README no longer quotes the CPU step rate'
    assert all(near(stated, float(step)) for stated, step in zip(claim.groups(), steps)), (
        claim.group(0), steps)
    gpu = table_with(performance, GPU_KERNEL)
    sizes = gpu['']
    claim = re.search(r'without mamba-ssm the network runs about (\d+)x\s+slower at (\d+x\d+) '
                      r'\(its scan in PyTorch; (\d+)x at (\d+x\d+)\)', readme)
    assert claim, 'the README no longer says how much slower the network runs without mamba-ssm'

    def slow_down(size: str) -> float:
        column = sizes.index(size)
        return (float(gpu[GPU_CHUNKED][column].split()[0])
                / float(gpu[GPU_KERNEL][column].split()[0]))
    for ratio, size in (claim.group(1, 2), claim.group(3, 4)):
        assert near(ratio, slow_down(size)), (ratio, size, slow_down(size))
    assert re.search(rf'chunked PyTorch scan, the network about {claim.group(1)}x slower',
                     prose(performance))


def ratio_problems(rows: dict, ratio_of) -> list[str]:
    """The cells `A (Rx)` or `A (B)` of `rows` whose bracket is not `ratio_of(name, column,
    match)` rounded as shown."""
    problems = []
    for name, cells in rows.items():
        for column, cell in enumerate(cells):
            bracket = re.fullmatch(r'([\d.]+) \(([\d.]+)x?\)', cell)
            if bracket and not near(bracket.group(2), ratio_of(name, column, bracket)):
                problems.append(f'{name}, column {column + 1}: {cell}')
    return problems


def test_ratios_and_rates_in_the_speed_tables_are_those_of_their_own_figures():
    # Side by side figures with their ratio in brackets: the ratio is of the figures shown, so a
    # figure measured again cannot leave its ratio behind.
    performance, batch = doc('docs/performance.md'), doc('docs/batch.md')
    gpu = table_with(performance, GPU_KERNEL)
    problems = ratio_problems({name: cells for name, cells in gpu.items() if 'ms (' in name},
                              lambda name, column, cell: 1000 / float(cell.group(1)))
    training = table_with(performance, 'preset (batch, crop)')
    header = training.pop('preset (batch, crop)')
    chunked, numba, speed_up, trainer = (header.index(name) for name in (
        'chunked PyTorch scan, s/step', 'numba backward, s/step', 'speed-up',
        '`s4fusion-train` before / now'))
    for name, cells in training.items():
        if not near(cells[speed_up].rstrip('x'), float(cells[chunked]) / float(cells[numba])):
            problems.append(f'{name}: speed-up {cells[speed_up]}')
        before_now = re.fullmatch(r'([\d.]+) / ([\d.]+) s \(([\d.]+)x\)', cells[trainer])
        if cells[trainer] and not (before_now and near(
                before_now.group(3), float(before_now.group(1)) / float(before_now.group(2)))):
            problems.append(f'{name}: {cells[trainer]}')
    runs = table_with(batch, '`s4fusion-bag` loop')
    loop = next(cells for name, cells in runs.items() if name.startswith('`s4fusion-bag` loop'))
    problems += ratio_problems(
        {name: cells for name, cells in runs.items() if name.startswith('`s4fusion-batch`')},
        lambda name, column, cell: float(cell.group(1)) / float(loop[column]))
    assert len(gpu) > 3 and len(training) == 3 and len(runs) == 4
    assert not problems, '\n'.join(problems)
