// The flows of E2B's coding-agent guide, with the unmodified JavaScript SDKs, against cellbox.
// The server and the three variables (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY) come from
// tests/e2e/test_e2b_js.py, which runs this file with `node --test`.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError } from 'e2b'
import { Sandbox as CodeInterpreter } from '@e2b/code-interpreter'

const PLOT_SCRIPT = `
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

with open("input.json") as f:
    data = json.load(f)
df = pd.DataFrame(data)
df.plot(x="x", y="y")
plt.savefig("output.png")
with open("summary.json", "w") as f:
    json.dump({"rows": len(df), "total": int(df["y"].sum())}, f)
print("saved output.png")
`
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]

let sbx
before(async () => {
  sbx = await Sandbox.create({ timeoutMs: 120_000, metadata: { suite: 'js-guide' } })
})
after(async () => {
  await sbx?.kill()
})

test('write a script that plots with pandas and matplotlib, run it, read the PNG and JSON back', async () => {
  await sbx.files.write('input.json', JSON.stringify({ x: [1, 2, 3], y: [4, 5, 6] }))
  await sbx.files.write('script.py', PLOT_SCRIPT)
  const out = []
  const err = []
  const result = await sbx.commands.run('python script.py', {
    onStdout: (d) => out.push(d),
    onStderr: (d) => err.push(d),
  })
  assert.equal(result.exitCode, 0, result.stderr)
  assert.match(out.join(''), /saved output\.png/)
  const png = await sbx.files.read('output.png', { format: 'bytes' })
  assert.deepEqual([...png.slice(0, 8)], PNG_MAGIC)
  const summary = JSON.parse(await sbx.files.read('summary.json'))
  assert.deepEqual(summary, { rows: 3, total: 15 })
})

test('onStdout and onStderr stream as the command runs', async () => {
  const out = []
  const err = []
  const result = await sbx.commands.run('echo one; echo two >&2; sleep 0.2; echo three', {
    onStdout: (d) => out.push(d),
    onStderr: (d) => err.push(d),
  })
  assert.equal(out.join(''), 'one\nthree\n')
  assert.equal(err.join(''), 'two\n')
  assert.equal(result.stdout, 'one\nthree\n')
})

test("a failing command's exitCode and stderr", async () => {
  await assert.rejects(
    sbx.commands.run('echo about to fail >&2; exit 3'),
    (e) => e instanceof CommandExitError && e.exitCode === 3 && e.stderr.includes('about to fail'),
  )
})

test('background command, stdin, list and kill', async () => {
  const handle = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(handle.pid, 'hello\n')
  const pids = (await sbx.commands.list()).map((p) => p.pid)
  assert.ok(pids.includes(handle.pid))
  await sbx.commands.closeStdin(handle.pid)
  const result = await handle.wait()
  assert.equal(result.stdout, 'hello\n')
  const sleeper = await sbx.commands.run('sleep 60', { background: true })
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
})

test('runCode keeps state and returns a chart', async () => {
  const ci = await CodeInterpreter.connect(sbx.sandboxId)
  await ci.runCode('x = 41')
  const ex = await ci.runCode('x + 1')
  assert.equal(ex.text, '42')
  const plot = await ci.runCode(
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('t')\nplt.show()",
  )
  assert.equal(plot.error, undefined)
  const png = plot.results.find((r) => r.png)?.png
  assert.ok(png, 'a PNG result')
  assert.deepEqual([...Buffer.from(png, 'base64').subarray(0, 8)], PNG_MAGIC)
  const chart = plot.results.find((r) => r.chart)?.chart // E2B's chart format, from e2b-charts
  assert.equal(chart?.type, 'line', JSON.stringify(plot.results.map((r) => Object.keys(r))))
  assert.equal(chart.title, 't')
  assert.deepEqual(
    chart.elements[0].points.map(([x, y]) => [Number(x), Number(y)]),
    [
      [1, 1],
      [2, 4],
      [3, 9],
    ],
  )
  const failed = await ci.runCode('undefined_name')
  assert.equal(failed.error?.name, 'NameError')
})

test('list finds the sandbox, kill ends it', async () => {
  const extra = await Sandbox.create({ metadata: { suite: 'js-kill' } })
  const page = await Sandbox.list({ query: { metadata: { suite: 'js-kill' } } }).nextItems()
  assert.deepEqual(
    page.map((s) => s.sandboxId),
    [extra.sandboxId],
  )
  assert.equal(await extra.isRunning(), true)
  await extra.kill()
  assert.equal(await extra.isRunning(), false)
  const after = await Sandbox.list({ query: { metadata: { suite: 'js-kill' } } }).nextItems()
  assert.deepEqual(after, [])
})
