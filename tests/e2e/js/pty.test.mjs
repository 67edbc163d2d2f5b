// PTY through the JavaScript SDK: create, sendInput, resize, connect (no replay), kill, ^D; users.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError } from 'e2b'

let sbx
before(async () => {
  sbx = await Sandbox.create({ timeoutMs: 120_000 })
})
after(async () => {
  await sbx?.kill()
})

// A terminal's output as onData delivers it, and a way to wait for a marker in it.
class Screen {
  constructor() {
    this.text = ''
    this.decoder = new TextDecoder()
    this.waiters = []
  }
  feed = (chunk) => {
    this.text += this.decoder.decode(chunk, { stream: true })
    for (const wake of this.waiters.splice(0)) wake()
  }
  count(marker) {
    return this.text.split(marker).length - 1
  }
  async until(marker, times = 1) {
    const deadline = AbortSignal.timeout(60_000)
    while (this.count(marker) < times) {
      if (deadline.aborted) throw new Error(`no ${JSON.stringify(marker)} in ${JSON.stringify(this.text)}`)
      await new Promise((resolve) => {
        this.waiters.push(resolve)
        deadline.addEventListener('abort', resolve, { once: true })
      })
    }
  }
}

const typed = (s) => new TextEncoder().encode(s)

test('pty: create, sendInput, resize, connect, kill', async () => {
  const screen = new Screen()
  const term = await sbx.pty.create({ rows: 30, cols: 100, onData: screen.feed, timeoutMs: 120_000 })
  await sbx.pty.sendInput(term.pid, typed('echo hi\n'))
  await screen.until('hi\r\n', 2) // the echoed input ("echo hi"), then the output
  await sbx.pty.sendInput(term.pid, typed('tty; stty size\n'))
  await screen.until('30 100\r\n')
  assert.ok(screen.text.includes('/dev/pts/'), screen.text)
  await sbx.pty.resize(term.pid, { rows: 50, cols: 120 })
  await sbx.pty.sendInput(term.pid, typed('stty size\n'))
  await screen.until('50 120\r\n')

  const later = new Screen()
  const again = await sbx.pty.connect(term.pid, { onData: later.feed, timeoutMs: 120_000 })
  await sbx.pty.sendInput(term.pid, typed('echo after-$((40+2))\n'))
  await later.until('after-42\r\n')
  assert.ok(!later.text.includes('50 120'), 'connect replayed old output')

  assert.equal(await sbx.pty.kill(term.pid), true)
  await assert.rejects(term.wait(), (e) => e instanceof CommandExitError)
  await assert.rejects(again.wait(), (e) => e instanceof CommandExitError)
  assert.equal(await sbx.pty.kill(term.pid), false)
})

test('commands: user "user" runs, "root" is refused by name', async () => {
  assert.equal((await sbx.commands.run('echo me', { user: 'user' })).stdout, 'me\n')
  await assert.rejects(sbx.commands.run('whoami', { user: 'root' }), /user 'root' is not available/)
})

test("pty: stdin is not closed (as envd), Ctrl+D ends the shell", async () => {
  const term = await sbx.pty.create({ rows: 24, cols: 80, onData: () => {}, timeoutMs: 120_000 })
  await assert.rejects(sbx.commands.closeStdin(term.pid), /cannot close stdin for PTY process/)
  await sbx.pty.sendInput(term.pid, new Uint8Array([0x04])) // EOF at the prompt: bash exits
  const result = await term.wait()
  assert.equal(result.exitCode, 0)
})

test('files as root: refused by name in a sandbox without root', async () => {
  await assert.rejects(
    sbx.files.write('/tmp/r.txt', 'x', { user: 'root' }),
    /user 'root' is not available: only a sandbox from a rootfs template has root/,
  )
})
