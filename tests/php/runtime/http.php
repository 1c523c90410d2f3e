<?php
// Front controller of the FPM runtime tests: the "action" query parameter
// picks what it does.

switch ($_GET['action'] ?? 'dump') {
    case 'dump':
        header('Content-Type: application/json');
        header('X-Multi: one');
        header('X-Multi: two', false);
        setcookie('first', '1');
        setcookie('second', '2');
        $server = [];
        foreach ($_SERVER as $name => $value) {
            if (str_starts_with($name, 'HTTP_') || in_array($name, [
                'REQUEST_METHOD', 'REQUEST_URI', 'QUERY_STRING', 'REMOTE_ADDR', 'SERVER_NAME', 'SERVER_PORT', 'HTTPS',
                'SCRIPT_FILENAME', 'SCRIPT_NAME', 'PATH_INFO', 'DOCUMENT_ROOT', 'CONTENT_TYPE', 'CONTENT_LENGTH',
                'SERVER_PROTOCOL',
            ], true)) {
                $server[$name] = $value;
            }
        }
        echo json_encode([
            'server' => $server,
            'get' => $_GET,
            'post' => $_POST,
            'cookies' => $_COOKIE,
            'input' => file_get_contents('php://input'),
            'context' => json_decode($_SERVER['LAMBDA_INVOCATION_CONTEXT'] ?? 'null', true),
            'requestContext' => json_decode($_SERVER['LAMBDA_REQUEST_CONTEXT'] ?? 'null', true),
        ]);
        break;
    case 'status':
        http_response_code((int) $_GET['code']);
        echo 'status set';
        break;
    case 'plain':
        echo 'hello from php-fpm';
        break;
    case 'binary':
        header('Content-Type: image/png');
        echo "\x89PNG\r\n\x1a\n\x00\x01\xff";
        break;
    case 'empty':
        http_response_code(204);
        break;
    case 'sleep':
        sleep(60);
        echo 'woke up';
        break;
    case 'fatal':
        ini_set('memory_limit', '16M');
        $blocks = [];
        while (true) {
            $blocks[] = str_repeat('x', 1 << 20);
        }
    case 'kill-worker':
        posix_kill(getmypid(), SIGKILL);
        break;
    case 'kill-master':
        $master = posix_getppid();
        if (!posix_kill($master, SIGKILL)) {
            echo 'kill failed: ' . posix_strerror(posix_get_last_error());
            break;
        }
        // Respond once the master is gone, when this worker has a new parent.
        for ($waited = 0; posix_getppid() === $master && $waited < 10000; $waited++) {
            usleep(1000);
        }
        echo posix_getppid() === $master ? "master $master still runs" : "killed $master";
        break;
    case 'large':
        echo str_repeat('x', 7 * 1024 * 1024);
        break;
    case 'pid':
        echo getmypid();
        break;
    case 'latin1-header':
        header("Content-Disposition: attachment; filename=\"caf\xe9.txt\"");
        echo 'latin-1 header';
        break;
}
