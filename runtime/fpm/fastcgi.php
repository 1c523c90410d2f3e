<?php
// The FPM runtime's side of php-fpm: starting and stopping the php-fpm
// process, and a FastCGI client for its unix socket.

declare(strict_types=1);

namespace PhpLambdaLayers\Runtime;

/** php-fpm timed out: no complete response before the invocation's deadline. */
final class FpmTimeout extends \RuntimeException
{
}

/** php-fpm is gone, or closed the connection before the end of its response. */
final class FpmUnavailable extends \RuntimeException
{
}

/** What php-fpm sent back for one request. */
final class FastCgiResponse
{
    public function __construct(public readonly string $stdout, public readonly string $stderr)
    {
    }
}

/** A php-fpm master process started by the runtime. */
final class Fpm
{
    /** Seconds php-fpm gets to open its socket. */
    private const START_TIMEOUT = 30.0;

    /** @var resource|null */
    private $process = null;
    private int $pid = 0;

    public function __construct(
        private readonly string $binary,
        private readonly string $config,
        private readonly string $socket,
    ) {
    }

    /** Starts php-fpm and waits until its socket accepts connections. */
    public function start(): void
    {
        $directory = dirname($this->socket);
        if (!is_dir($directory) && !@mkdir($directory, 0700, true) && !is_dir($directory)) {
            throw new \RuntimeException("Cannot create $directory for the php-fpm socket");
        }
        // A socket left by a php-fpm that died would accept nothing, but it
        // must not be mistaken for the new one.
        if (file_exists($this->socket)) {
            @unlink($this->socket);
        }
        // php-fpm's log and its workers' output go to the function's log:
        // its stderr is the runtime's stdout.
        $process = proc_open(
            [$this->binary, '--nodaemonize', '--fpm-config', $this->config],
            [0 => ['file', '/dev/null', 'r'], 1 => STDOUT, 2 => STDOUT],
            $pipes,
        );
        if ($process === false) {
            throw new \RuntimeException("Cannot start {$this->binary}");
        }
        $this->process = $process;
        $this->pid = proc_get_status($process)['pid'];

        $started = microtime(true);
        while (true) {
            $status = proc_get_status($process);
            if (!$status['running']) {
                $this->process = null;
                proc_close($process);
                throw new \RuntimeException("php-fpm exited during startup with status {$status['exitcode']}; its log is above");
            }
            $connection = @stream_socket_client("unix://{$this->socket}", $errno, $message, 1.0);
            if ($connection !== false) {
                fclose($connection);
                return;
            }
            if (microtime(true) - $started > self::START_TIMEOUT) {
                $this->stop();
                throw new \RuntimeException(sprintf('php-fpm did not open %s within %d s', $this->socket, self::START_TIMEOUT));
            }
            usleep(5000);
        }
    }

    public function isRunning(): bool
    {
        return $this->process !== null && proc_get_status($this->process)['running'];
    }

    /**
     * Stops php-fpm and its workers. A worker may be stuck in a request, so
     * the workers are killed first. The master then gets a moment to remove
     * its socket. Workers left behind by a master that died are killed too:
     * they still hold the listening socket, and a new master would fail
     * to start beside them.
     */
    public function stop(): void
    {
        $workers = self::workers($this->pid);
        foreach ($workers as $worker) {
            posix_kill($worker, SIGKILL);
        }
        // A worker keeps accepting connections on the socket until the
        // kernel has ended it. A live master must also reap its dead workers
        // before SIGTERM, because Linux delivers a pending SIGTERM before a
        // pending SIGCHLD, and a terminating master logs child exits only at
        // debug level.
        $master = $this->isRunning() ? $this->pid : 0;
        $deadline = microtime(true) + 2.0;
        while (array_filter($workers, static fn (int $pid): bool => !self::isSettled($pid, $master)) !== []
            && microtime(true) < $deadline) {
            usleep(2000);
        }
        if ($this->process === null) {
            return;
        }
        proc_terminate($this->process, SIGTERM);
        $deadline = microtime(true) + 2.0;
        while (proc_get_status($this->process)['running'] && microtime(true) < $deadline) {
            usleep(5000);
        }
        if (proc_get_status($this->process)['running']) {
            proc_terminate($this->process, SIGKILL);
        }
        proc_close($this->process);
        $this->process = null;
    }

    public function restart(): void
    {
        $this->stop();
        $this->start();
    }

    /**
     * Sends one request and waits for the whole response until `$deadline`
     * (seconds since the epoch).
     *
     * @param array<string, string> $params
     */
    public function request(array $params, string $body, float $deadline): FastCgiResponse
    {
        $connection = @stream_socket_client("unix://{$this->socket}", $errno, $message, 1.0);
        if ($connection === false) {
            throw new FpmUnavailable("Cannot connect to php-fpm at {$this->socket}: $message");
        }
        try {
            return self::exchange($connection, $params, $body, $deadline);
        } finally {
            fclose($connection);
        }
    }

    /**
     * @param resource $connection
     * @param array<string, string> $params
     */
    private static function exchange($connection, array $params, string $body, float $deadline): FastCgiResponse
    {
        // FCGI_BEGIN_REQUEST: role FCGI_RESPONDER, no FCGI_KEEP_CONN.
        $request = self::record(1, pack('nCx5', 1, 0));
        $encoded = '';
        foreach ($params as $name => $value) {
            $encoded .= self::length(strlen((string) $name)) . self::length(strlen($value)) . $name . $value;
        }
        foreach (str_split($encoded, 65535) as $chunk) {
            $request .= self::record(4, $chunk);
        }
        $request .= self::record(4, '');
        foreach ($body === '' ? [] : str_split($body, 65535) as $chunk) {
            $request .= self::record(5, $chunk);
        }
        $request .= self::record(5, '');

        stream_set_blocking($connection, false);
        $stdout = '';
        $stderr = '';
        $buffer = '';
        $written = 0;
        while (true) {
            $remaining = $deadline - microtime(true);
            if ($remaining <= 0) {
                throw new FpmTimeout('php-fpm timed out before the deadline');
            }
            $read = [$connection];
            $write = $written < strlen($request) ? [$connection] : [];
            $except = null;
            $seconds = (int) $remaining;
            if (@stream_select($read, $write, $except, $seconds, (int) (($remaining - $seconds) * 1e6)) === false) {
                throw new FpmUnavailable('Waiting for php-fpm failed');
            }
            if ($write !== []) {
                $sent = @fwrite($connection, substr($request, $written, 1 << 20));
                if ($sent === false) {
                    // The worker may respond without reading the whole body,
                    // so read what it sent.
                    $written = strlen($request);
                } else {
                    $written += $sent;
                }
            }
            if ($read === []) {
                continue;
            }
            $chunk = fread($connection, 1 << 20);
            if ($chunk === false || ($chunk === '' && feof($connection))) {
                throw new FpmUnavailable('php-fpm closed the connection before the end of its response');
            }
            $buffer .= $chunk;
            while (strlen($buffer) >= 8) {
                $header = unpack('Cversion/Ctype/nid/nlength/Cpadding', $buffer);
                $size = 8 + $header['length'] + $header['padding'];
                if (strlen($buffer) < $size) {
                    break;
                }
                $content = substr($buffer, 8, $header['length']);
                $buffer = substr($buffer, $size);
                switch ($header['type']) {
                    case 6: // FCGI_STDOUT
                        $stdout .= $content;
                        break;
                    case 7: // FCGI_STDERR
                        $stderr .= $content;
                        break;
                    case 3: // FCGI_END_REQUEST
                        return new FastCgiResponse($stdout, $stderr);
                }
            }
        }
    }

    private static function record(int $type, string $content): string
    {
        return pack('CCnnCx', 1, $type, 1, strlen($content), 0) . $content;
    }

    private static function length(int $length): string
    {
        return $length < 128 ? chr($length) : pack('N', $length | 0x80000000);
    }

    /**
     * Returns whether the process `$pid` has ended and, when `$master`
     * (non-zero) is its parent, has been reaped by it. A zombie of another
     * parent counts as ended, because after a master's death it may never
     * be reaped.
     */
    private static function isSettled(int $pid, int $master): bool
    {
        $status = self::status($pid);
        if ($status === null) {
            return true;
        }
        [$state, $parent] = $status;
        return $state === 'Z' && ($master === 0 || $parent !== $master);
    }

    /** @return array{string, int}|null the state and the parent of `$pid`, or null once it is gone */
    private static function status(int $pid): ?array
    {
        $stat = @file_get_contents("/proc/$pid/stat");
        if ($stat === false) {
            return null;
        }
        // The command name may hold spaces and parentheses: the fields
        // after the last ')' are the state, then the parent's pid.
        $fields = explode(' ', substr($stat, (int) strrpos($stat, ')') + 2));
        return [$fields[0], (int) ($fields[1] ?? 0)];
    }

    /**
     * @return list<int> the children of `$master` and every process named
     *                   like a php-fpm worker ("php-fpm: pool ...")
     */
    private static function workers(int $master): array
    {
        $workers = [];
        foreach (glob('/proc/[0-9]*') ?: [] as $directory) {
            $pid = (int) basename($directory);
            $status = self::status($pid);
            if ($status === null || $pid === getmypid()) {
                continue;
            }
            $parent = $status[1];
            $commandLine = (string) @file_get_contents("$directory/cmdline");
            if (($master !== 0 && $parent === $master) || str_starts_with($commandLine, 'php-fpm: pool ')) {
                $workers[] = $pid;
            }
        }
        return $workers;
    }
}
